"""`packtune bench hf-step`: one training step of a transformers Llama on a packed row, with and
without `apply_packtune`.

`transformers`: the model as transformers ships it (packing found from position_ids, a dense
block-diagonal mask, [T, V] logits upcast to fp32 for the loss); `packtune`: the same model after
`apply_packtune` (varlen attention, packtune's norm/rotary/SwiGLU kernels, the fused linear
cross-entropy that never forms the logits). Random weights, a packed row of `samples` samples with
their first half as prompt (not trained). A step is one forward and one backward.
"""

from __future__ import annotations

import torch

from packtune.bench import harness

IMPLS = ("transformers", "packtune")


def make_step(impl: str, shape: dict, dtype: str, device: str):
    import transformers

    from packtune.integrations import PackedCollator, apply_packtune

    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    torch.manual_seed(0)
    hidden = shape["hidden"]
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=shape["layers"],
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=shape["T"],
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, dtype)).train()
    if impl == "packtune":
        apply_packtune(model)
    length = shape["T"] // shape["samples"]
    samples = [
        {
            "input_ids": torch.randint(0, shape["vocab"], (length,)).tolist(),
            "loss_mask": [0] * (length // 2) + [1] * (length - length // 2),
        }
        for _ in range(shape["samples"])
    ]
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in PackedCollator()(samples).items()
    }

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    return step


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("hf_step", __doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = [
        {
            "T": args.tokens,
            "samples": args.samples,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
        }
    ]
    harness.run_table("hf_step", "packtune.bench.hf_step:make_step", IMPLS, shapes, "transformers", args)
