"""`packtune bench moe`: a mixture-of-experts layer's experts, forward+backward, packtune vs transformers 5.

The layer is Qwen3-30B-A3B's (hidden 2048, moe_intermediate 768, 128 experts, top-8; `--model
gpt-oss-20b`: hidden 2880, intermediate 2880, 32 experts, top-4, biases, clamped SwiGLU; name both
for one table) with the hidden and intermediate sizes divided by `--scale` so it fits a CPU; the
expert count and top-k stay. A uniformly random router picks the experts (softmax over random
logits, top-k, Qwen3's renormalised weights); x, the routing weights and the expert weights all get gradients.

Implementations: transformers' own expert module of that family (Qwen3MoeExperts / GptOssExperts)
under each `experts_implementation` it offers on every device: `eager` (a Python loop over the
experts hit), `grouped_mm` (its default: torch's grouped GEMM over expert-sorted rows) and
`batched_mm` (one bmm per token over gathered weights: [T*k, 2I, H] of them, made for decoding);
`packtune` (`moe_experts`, its default backend: C++ on CPU, Triton on CUDA); and `torch-grouped-mm`,
packtune's sorted routing with torch._grouped_mm for the two GEMMs and autograd for the rest (the
alternative to the C++ backend on CPU: the faster of the two is the CPU backend). Ratios are against
`grouped_mm`; the last lines compare packtune with transformers' fastest in this run.
"""

from __future__ import annotations

import torch

from packtune.bench import harness
from packtune.kernels.moe import SWIGLU, gpt_oss_format, moe_experts, route_to_experts

TRANSFORMERS = ("eager", "grouped_mm", "batched_mm")
IMPLS = (*TRANSFORMERS, "torch-grouped-mm", "packtune")
MODELS = {
    "qwen3-30b-a3b": {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8},
    "gpt-oss-20b": {"hidden": 2880, "inter": 2880, "experts": 32, "top_k": 4},
}


def _hf_experts(model: str, shape: dict, impl: str) -> torch.nn.Module:
    if model == "gpt-oss-20b":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssExperts

        config = GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                              num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        experts_class = GptOssExperts
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts

        config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                                num_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        experts_class = Qwen3MoeExperts
    config._experts_implementation = impl
    return experts_class(config)


def _torch_grouped_mm(x, index, weights, gate_up, down, gate_up_bias, down_bias, fmt):
    """packtune's routing, torch._grouped_mm GEMMs, autograd through torch ops."""
    routing = route_to_experts(index, gate_up.shape[0])
    offsets = routing.ends.to(torch.int32)
    w_gate_up, w_down = fmt.in_out(gate_up, down)
    gu = torch._grouped_mm(x[routing.token], w_gate_up, offs=offsets)
    if gate_up_bias is not None:
        gu = gu + gate_up_bias[routing.expert]
    y = torch._grouped_mm(fmt.activation(gu), w_down, offs=offsets)
    if down_bias is not None:
        y = y + down_bias[routing.expert]
    y = y * weights.reshape(-1)[routing.order, None]
    return y[routing.position].view(*index.shape, -1).sum(1)


def make_step(impl: str, shape: dict, dtype: str, device: str):
    dt = getattr(torch, dtype)
    gpt_oss = shape["model"] == "gpt-oss-20b"
    fmt = gpt_oss_format() if gpt_oss else SWIGLU
    hidden, inter, experts, top_k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    gate_up = (experts, hidden, 2 * inter) if gpt_oss else (experts, 2 * inter, hidden)
    down = (experts, inter, hidden) if gpt_oss else (experts, hidden, inter)
    with torch.device(device):  # built where they run (gpt-oss-20b's experts are 0.8 G parameters)
        params = {"gate_up_proj": torch.randn(gate_up) / hidden**0.5,
                  "down_proj": torch.randn(down) / inter**0.5}
        if gpt_oss:
            params |= {"gate_up_proj_bias": torch.randn(experts, 2 * inter) * 0.1,
                       "down_proj_bias": torch.randn(experts, hidden) * 0.1}
    params = {k: torch.nn.Parameter(v.to(dt)) for k, v in params.items()}
    x = torch.randn(shape["T"], hidden, device=device, dtype=dt, requires_grad=True)
    probs = torch.randn(shape["T"], experts, device=device).softmax(-1)
    weights, index = torch.topk(probs, top_k)
    if not gpt_oss:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(dt).requires_grad_()
    dy = torch.randn_like(x)
    biases = (params.get("gate_up_proj_bias"), params.get("down_proj_bias"))
    if impl in TRANSFORMERS:
        with torch.device("meta"):  # no storage: the parameters are replaced by the shared ones
            module = _hf_experts(shape["model"], shape, impl)
        for name, p in params.items():
            setattr(module, name, p)

        def forward():
            return module(x, index, weights)
    elif impl in ("packtune", "torch-grouped-mm"):
        fn = moe_experts if impl == "packtune" else _torch_grouped_mm

        def forward():
            return fn(x, index, weights, params["gate_up_proj"], params["down_proj"], *biases, fmt)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    leaves = [x, weights, *params.values()]

    def step() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    step.leaves = leaves
    return step


def main(argv: list[str]) -> None:
    parser = harness.bench_parser("moe", __doc__)
    parser.add_argument("--model", nargs="+", default=["qwen3-30b-a3b"], choices=sorted(MODELS),
                        help="the layer shape(s); several give one table")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--scale", type=int, default=8, help="divide the hidden and intermediate sizes")
    args = parser.parse_args(argv)
    shapes = [{"model": model, "T": args.tokens, "hidden": MODELS[model]["hidden"] // args.scale,
               "inter": MODELS[model]["inter"] // args.scale, "experts": MODELS[model]["experts"],
               "top_k": MODELS[model]["top_k"]} for model in args.model]
    rows = harness.run_table("moe", "packtune.bench.moe:make_step", IMPLS, shapes, "grouped_mm", args)
    for shape in shapes:
        measured = {r["implementation"]: r for r in rows if r["shape"] == shape and "median_s" in r}
        theirs = [measured[i] for i in TRANSFORMERS if i in measured]
        if "packtune" in measured and theirs:
            ours, fastest = measured["packtune"], min(theirs, key=lambda r: r["median_s"])
            print(f"{shape['model']}: packtune vs transformers' fastest ({fastest['implementation']}): "
                  f"{fastest['median_s'] / ours['median_s']:.2f}x faster, "
                  f"{ours['peak_bytes'] / max(fastest['peak_bytes'], 1):.2f}x its peak memory")
