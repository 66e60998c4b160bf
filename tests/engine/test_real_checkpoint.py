"""The real stories260K Llama (llama2.c's tinyllamas, in ../shared/real) through packtune's loader
and generation: its documented greedy continuation, alone and decoded in a batch with other
prompts of other lengths."""

import sentencepiece
from real_files import real_path

from packtune.model.generate import generate, generate_batch, generate_text
from packtune.model.hf_io import load_pretrained

PROMPT = "Once upon a time, there was a little girl named"
KNOWN = "Lily. She loved to play outside in the park. One day, she saw a big, red ball"
"""llama2.c's documented `run.c` output for this prompt (30 greedy tokens), per ../shared/real/README.md."""


def test_greedy_continuation_is_the_documented_one():
    text = generate_text(real_path("stories260K"), PROMPT, max_new_tokens=30)
    assert text.startswith(KNOWN), text


def test_batched_greedy_equals_one_prompt_at_a_time_on_real_weights():
    model_dir = real_path("stories260K")
    model = load_pretrained(model_dir).eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    texts = [PROMPT, "Tom had a dog.", "The sun", "One day, a big bird flew over the little house and saw"]
    prompts = [[sp.bos_id(), *sp.encode(text)] for text in texts]
    alone = [generate(model, p, 20, eos_id=2) for p in prompts]
    assert generate_batch(model, prompts, 20, eos_id=2, batch_size=3) == alone
    assert sp.decode(alone[0]).startswith(KNOWN[:40])
