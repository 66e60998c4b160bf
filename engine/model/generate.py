"""Text generation with a KV cache: greedy, or temperature + top-p (nucleus) sampling; stops at EOS.

Decoding follows transformers' `generate`: next-token logits in fp32, argmax for greedy (first
index on ties), temperature before top-p, the nucleus being the most likely tokens whose mass
before them is below `top_p` (the most likely token always stays).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from packtune.model.kv_cache import KVCache
from packtune.model.llama import LlamaForCausalLM


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus: tokens, by falling probability, whose preceding mass is < top_p."""
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token from a `[V]` logits row."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~top_p_mask(probs, top_p), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (the EOS included when generation stopped on it)."""
    weight = model.embed_tokens.weight
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=weight.device).flatten()
    if ids.numel() == 0:
        raise ValueError("generate: the prompt is empty")
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    cache = KVCache(model.args, ids.numel() + max_new_tokens, device=weight.device, dtype=weight.dtype)
    out: list[int] = []
    while len(out) < max_new_tokens:
        last = model.hidden_states(ids, cache=cache)[-1]  # logits of the last position only
        token = next_token(model.logits(last), temperature, top_p, generator)
        out.append(token)
        if token in stop:
            break
        ids = torch.tensor([token], device=weight.device)
    return out


def _tokenizer(model_dir: Path) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """encode/decode from the model directory: sentencepiece `tokenizer.model`, else `tokenizer.json`."""
    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
        return (lambda text: bos + sp.encode(text)), sp.decode
    if (model_dir / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(
                f"{model_dir}/tokenizer.json needs the `tokenizers` package (pip install tokenizers)"
            ) from None
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return (lambda text: tok.encode(text).ids), (lambda ids: tok.decode(ids, skip_special_tokens=True))
    raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json to encode the prompt with")


def _eos_ids(model_dir: Path, model: LlamaForCausalLM) -> list[int]:
    """eos ids from generation_config.json (chat models list end-of-turn there), else config.json."""
    eos = model.args.eos_token_id
    gen_config = model_dir / "generation_config.json"
    if gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id", eos)
    return [eos] if isinstance(eos, int) else list(eos or ())


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    template: str = "raw",
    adapter: str | Path | None = None,
) -> str:
    """Load `model_dir` and return the decoded continuation of `prompt`: as given (`raw`), or asked
    as a user turn in `template` (`auto`: the model's chat template), tokenized as in training.
    `adapter`: a PEFT LoRA adapter directory applied on top of the model."""
    from packtune.model.hf_io import load_pretrained

    model_dir = Path(model_dir)
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    if adapter:
        from packtune.lora.peft_format import load_adapter_into

        load_adapter_into(model, adapter)
        model.eval()
    if template == "raw":
        encode, decode = _tokenizer(model_dir)
        eos = _eos_ids(model_dir, model)
    else:
        from packtune.data.formats import Message
        from packtune.data.prompt import PromptEncoder

        prompts = PromptEncoder(model_dir, template)
        encode, decode = (lambda text: prompts.encode([[Message("user", text)]])[0]), prompts.decode
        eos = prompts.stop_ids or _eos_ids(model_dir, model)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    new = generate(model, encode(prompt), max_new_tokens, eos, temperature, top_p, generator)
    if new and new[-1] in eos:
        new = new[:-1]
    return decode(new)
