"""`packtune bench lora`: a LoRA linear and a LoRA MLP, forward+backward, packtune vs PEFT.

`peft`: PEFT's `lora.Linear` around a frozen nn.Linear in eager mode (the baseline; the MLP is
Llama's, down(silu(gate(x)) * up(x)), with each projection PEFT-wrapped); `peft-compile`: the
same under torch.compile; `packtune`: packtune's LoRALinear / LoRAMLP (the fused kernels). The
input requires a gradient, as inside a model. Shapes are Llama-7B's (hidden 4096, intermediate
11008) divided by `--scale` so they fit a CPU; ranks 16 and 64; LoRA dropout 0 (`--dropout 0.1`
also times the masks: packtune draws them inside its kernels, PEFT applies nn.Dropout). The saved
activations are measured on `--device` too.
"""

from __future__ import annotations

import torch
from torch import nn

from packtune.bench import harness

IMPLS = ("peft", "peft-compile", "packtune")


def _frozen_linear(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    layer.weight.requires_grad_(False)
    return layer


def _lora(impl: str, base: nn.Linear, rank: int, dropout: float) -> nn.Module:
    """One LoRA linear over `base`, with nonzero B (a trained adapter's cost), in training mode."""
    if impl == "packtune":
        from packtune.lora.modules import LoRALinear

        layer = LoRALinear(base, rank, scale=2.0, dropout=dropout)
        nn.init.normal_(layer.lora_B, std=0.02)
        return layer
    import peft
    from peft.tuners.lora import Linear

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights=False)
    return Linear(base, "default", config=config, r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                  init_lora_weights=False)


class _PeftMLP(nn.Module):
    """transformers' LlamaMLP over PEFT-wrapped projections."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _module(impl: str, shape: dict, dtype: torch.dtype, device: str) -> nn.Module:
    kind = "packtune" if impl == "packtune" else "peft"
    hidden, inter, rank, dropout = shape["hidden"], shape["inter"], shape["rank"], shape.get("dropout", 0.0)
    if shape["op"] == "linear":
        module = _lora(kind, _frozen_linear(hidden, inter, dtype, device), rank, dropout)
    else:
        gate, up, down = (_lora(kind, _frozen_linear(i, o, dtype, device), rank, dropout)
                          for i, o in ((hidden, inter), (hidden, inter), (inter, hidden)))
        if kind == "packtune":
            from packtune.lora.modules import LoRAMLP

            module = LoRAMLP(gate, up, down)
        else:
            module = _PeftMLP(gate, up, down)
    module.to(device)
    return torch.compile(module, dynamic=False) if impl == "peft-compile" else module


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    module = _module(impl, shape, dt, device)
    x = torch.randn(shape["T"], shape["hidden"], device=device, dtype=dt, requires_grad=True)
    out_features = shape["inter"] if shape["op"] == "linear" else shape["hidden"]
    dy = torch.randn(shape["T"], out_features, device=device, dtype=dt)
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)

    return step


def saved_bytes(impl: str, shape: dict, dtype: str = "float32", device: str = "cpu") -> int:
    """Bytes the forward keeps for the backward (autograd's saved tensors, each storage counted
    once, the frozen weights and the input excluded): the activation memory a layer holds
    between its forward and backward in a model."""
    dt = getattr(torch, dtype)
    module = _module("packtune" if impl == "packtune" else "peft", shape, dt, device)
    x = torch.randn(shape["T"], shape["hidden"], device=device, dtype=dt, requires_grad=True)
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("lora", __doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--scale", type=int, default=4,
                        help="divide Llama-7B's hidden and intermediate sizes")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ops", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0], help="LoRA dropout rates")
    args = parser.parse_args(argv)
    hidden, inter = 4096 // args.scale, 11008 // args.scale
    shapes = [{"op": op, "T": args.tokens, "hidden": hidden, "inter": inter, "rank": rank, "dropout": p}
              for op in args.ops for rank in args.ranks for p in args.dropout]
    harness.run_table("lora", "packtune.bench.lora:make_step", IMPLS, shapes, "peft", args)
    print("activations saved for the backward (what each layer holds until its backward runs):")
    for shape in shapes:
        peft_bytes = saved_bytes("peft", shape, args.dtype, args.device)
        ours = saved_bytes("packtune", shape, args.dtype, args.device)
        print(f"  {shape['op']:<7}rank {shape['rank']:<4}dropout {shape['dropout']:<5}"
              f"peft {peft_bytes / 2**20:8.1f} MiB   "
              f"packtune {ours / 2**20:8.1f} MiB   ({ours / peft_bytes:.2f}x)")
