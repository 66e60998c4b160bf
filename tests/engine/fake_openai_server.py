"""A deterministic OpenAI-compatible chat server for the self-instruct tests, run as its own process:
`python fake_openai_server.py PORT_FILE [FAIL_FIRST]` listens on 127.0.0.1 (a free port, written to
PORT_FILE) and answers `/v1/chat/completions` by the prompt's kind:

- a proposal prompt ("Come up with a series ..."): the next four lines of `PROPOSALS`, in turn
  (kept ones, and ones each filter drops);
- a classification question: Yes when the task starts with "Classify";
- an instance prompt: an input and output made from the task's words.

With FAIL_FIRST = n, the first n requests get HTTP 503 (the client must retry). Every request is
logged (one JSON line) to PORT_FILE + ".log".
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPOSALS = [
    "Summarize the story of a famous novel in two sentences.",
    "Classify the following animal as a mammal, bird or fish.",
    "Describe the image in one sentence.",  # unactionable word
    "Hi there",  # too short
    "Summarize the story of a famous novel in three sentences.",  # ROUGE-L >= 0.7 with the first
    "Translate the sentence into French.",
    "- List three fruits that are red.",  # starts with punctuation
    "Explain why the sky looks blue during the day.",
    "Classify the sentiment of this tweet as positive or negative.",
    "Give five synonyms for the word happy.",
    "Write a haiku about autumn leaves falling slowly.",
    "Convert the temperature from Celsius to Fahrenheit.",
    "Suggest a name for a new coffee shop near the sea.",
    "Explain how a bicycle stays upright while moving.",
    "Classify the number as prime or composite.",
    "Rewrite the sentence in the passive voice.",
]

state = {"requests": 0, "proposals": 0}
lock = threading.Lock()


def answer(prompt: str) -> str:
    last_task = [line for line in prompt.splitlines() if line.startswith("Task:")]
    if prompt.startswith("Come up with a series"):
        with lock:
            start = state["proposals"]
            state["proposals"] += 4
        lines = [PROPOSALS[(start + i) % len(PROPOSALS)] for i in range(4)]
        return "\n".join(f"Task {9 + i}: {text}" for i, text in enumerate(lines))
    task = last_task[-1][len("Task:"):].strip() if last_task else ""
    if prompt.startswith("Can the task be regarded"):
        return "Yes" if task.startswith("Classify") else "No"
    words = task.rstrip(".").split()
    if prompt.startswith("Given a classification task"):
        return f"Class label: {words[-1]}\nInput: an example about {' '.join(words[1:3])}"
    return f"Input: {' '.join(words[-2:])}\nOutput: an answer to '{task}'"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            state["requests"] += 1
            number = state["requests"]
        with open(sys.argv[1] + ".log", "a") as log:
            log.write(json.dumps({"n": number, "path": self.path, "auth": self.headers.get("Authorization"),
                                  "model": body.get("model")}) + "\n")
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        if number <= fail_first:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b"busy")
            return
        text = answer(body["messages"][-1]["content"])
        payload = json.dumps({"object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


if __name__ == "__main__":
    fail_first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()
