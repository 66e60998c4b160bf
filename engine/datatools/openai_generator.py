"""A text generator behind any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang,
llama.cpp server, Ollama, OpenAI), with the standard library only.

Each prompt is one request (one user message). Requests run `concurrency` at a time; a timeout, a
refused connection, HTTP 408 / 409 / 429 or a 5xx is retried up to `retries` times with exponential
backoff (honouring Retry-After); another 4xx is not (the request itself is wrong).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from packtune.errors import PacktuneError

RETRIED_STATUS = (408, 409, 429)


class GeneratorError(PacktuneError, RuntimeError):
    """The endpoint failed for good (after the retries, or with a non-retryable status)."""

    kind = "generator"


def chat_completions_url(base_url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1` both mean `http://host:8000/v1/chat/completions`."""
    base = base_url.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


class OpenAIChatGenerator:
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 max_tokens: int = 512, temperature: float = 0.7, top_p: float = 1.0, seed: int | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 1.0,
                 concurrency: int = 4) -> None:
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key = os.environ.get(api_key_env, "")
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            self.sampling["seed"] = seed
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency = max(concurrency, 1)

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One completion per prompt, in order; GeneratorError when one fails for good."""
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(prompts), 1))) as pool:
            return list(pool.map(self._complete_one, prompts))

    def _complete_one(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           **self.sampling}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _message_text(json.loads(response.read().decode("utf-8")), self.url)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in RETRIED_STATUS and e.code < 500:
                    raise GeneratorError(f"{self.url}: HTTP {e.code}: {detail}") from None
                failure = f"HTTP {e.code}: {detail}"
                retry_after = _seconds(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                failure = str(getattr(e, "reason", e))
            except json.JSONDecodeError as e:
                failure = f"not JSON: {e}"
            if attempt < self.retries:
                time.sleep(retry_after if retry_after is not None else self.backoff * 2**attempt)
        raise GeneratorError(f"{self.url}: failed {self.retries + 1} times; last: {failure}")


def _seconds(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None


def _message_text(payload: dict, url: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise GeneratorError(f"{url}: no choices[0].message.content in the response: "
                             f"{json.dumps(payload)[:300]}") from None
    return content or ""
