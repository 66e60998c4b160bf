"""The MoE expert block (kernels/moe.py): every backend against the float64 reference, values and all
gradients (x, routing weights, expert weights, biases), for both transformers layouts; the
reference and the C++ backend against transformers 5's own expert modules in float64."""

import pytest
import torch
from kernel_checks import FUSED, assert_fp32_close, device_for

from packtune.kernels import _dispatch
from packtune.kernels.moe import SWIGLU, gpt_oss_format, moe_experts, moe_experts_ref, route_to_experts

GPT_OSS = gpt_oss_format(alpha=1.702, limit=1.5)  # a low limit: the random values hit both clamps
FORMATS = {"swiglu": SWIGLU, "gpt_oss": GPT_OSS}
ROUTINGS = [  # (T, H, I, E, k, how tokens pick experts)
    (13, 10, 6, 5, 2, "random"),
    (9, 8, 5, 4, 1, "random"),  # top-1
    (70, 12, 6, 6, 1, "one"),  # every token on expert 3, past one 64-row tile; the others empty
    (12, 10, 6, 6, 2, "two"),  # every token on experts 2 and 4: four empty experts
]


def _top_k(tokens: int, experts: int, k: int, how: str) -> torch.Tensor:
    if how == "one":
        return torch.full((tokens, k), 3)
    if how == "two":
        return torch.tensor([[2, 4], [4, 2]]).repeat(tokens, 1)[:tokens]
    if tokens == 0:
        return torch.zeros(0, k, dtype=torch.long)
    return torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])


def _case(fmt, tokens, hidden, inter, experts, k, how, bias):
    """float64 leaves (x, weights, gate_up, down[, biases]), the indices and dy."""
    gate_up = (experts, hidden, 2 * inter) if fmt.transposed else (experts, 2 * inter, hidden)
    down = (experts, inter, hidden) if fmt.transposed else (experts, hidden, inter)
    leaves = [torch.randn(tokens, hidden, dtype=torch.float64), torch.rand(tokens, k, dtype=torch.float64),
              torch.randn(gate_up, dtype=torch.float64), torch.randn(down, dtype=torch.float64) / inter**0.5]
    if bias:
        leaves += [torch.randn(experts, n, dtype=torch.float64) for n in (2 * inter, hidden)]
    return leaves, _top_k(tokens, experts, k, how), torch.randn(tokens, hidden, dtype=torch.float64)


def _run(fn, leaves, index, dy, fmt, dtype, device="cpu"):
    """[y, dx, dweights, dgate_up, ddown(, dbiases)] with the leaves in `dtype` on `device`."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in leaves]
    x, weights, gate_up, down, *biases = leaves
    y = fn(x, index.to(device), weights, gate_up, down, *(biases or [None, None]), fmt)
    y.backward(dy.to(device, dtype))
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("case", ROUTINGS, ids=lambda c: f"T{c[0]}-E{c[3]}-k{c[4]}-{c[5]}")
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("backend", FUSED)
def test_fp32_matches_float64_reference(backend, name, case):
    fmt = FORMATS[name]
    leaves, index, dy = _case(fmt, *case, bias=name == "gpt_oss")
    exact = _run(moe_experts_ref, leaves, index, dy, fmt, torch.float64)
    got = _run(lambda *a: moe_experts(*a, backend=backend), leaves, index, dy, fmt, torch.float32,
               device_for(backend))
    for i, (out, ref) in enumerate(zip(got, exact, strict=True)):
        assert_fp32_close(out.cpu(), ref, 1e-5 if i == 0 else 1e-4)


@pytest.mark.skipif(_dispatch.cpu_extension() is None, reason="packtune._C not built")
@pytest.mark.parametrize("name", FORMATS)
def test_cpu_float64_equals_reference(name):
    """The C++ backend computes float64 in float64: equal to the reference to rounding."""
    fmt = FORMATS[name]
    for case in ROUTINGS:
        leaves, index, dy = _case(fmt, *case, bias=name == "gpt_oss")
        exact = _run(moe_experts_ref, leaves, index, dy, fmt, torch.float64)
        got = _run(lambda *a: moe_experts(*a, backend="cpu"), leaves, index, dy, fmt, torch.float64)
        for out, ref in zip(got, exact, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_no_worse_than_torch(backend, name):
    # bf16 on the C++ backend; fp16 on Triton, whose interpreter computes bf16 dots unreliably
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    fmt = FORMATS[name]
    leaves, index, dy = _case(fmt, 40, 24, 12, 6, 2, "random", bias=name == "gpt_oss")
    dev = device_for(backend)
    got = _run(lambda *a: moe_experts(*a, backend=backend), leaves, index, dy, fmt, dtype, dev)
    eager = _run(moe_experts_ref, leaves, index, dy, fmt, dtype, dev)
    exact = _run(moe_experts_ref, leaves, index, dy, fmt, torch.float64)
    for out, torch_out, ref in zip(got, eager, exact, strict=True):
        assert out.dtype == dtype
        # kernel_checks' bar (PyTorch's own error + 1e-2), and at least one rounding of the largest
        # entry: the two round intermediates (gu, h, dh) at different steps, so their last roundings differ
        err, torch_err = ((t.cpu().double() - ref).abs().max().item() for t in (out, torch_out))
        one_rounding = ref.abs().max().item() * torch.finfo(dtype).eps / 2
        assert err <= torch_err + max(1e-2, one_rounding), f"error {err:.3g} vs PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("backend", FUSED)
def test_frozen_experts_and_inference(backend):
    """Frozen expert weights (LoRA trains around them) get no gradient and the others stay exact;
    without any gradient wanted the forward keeps nothing for a backward."""
    dev = device_for(backend)
    leaves, index, dy = _case(SWIGLU, 13, 10, 6, 5, 2, "random", bias=False)
    exact = _run(moe_experts_ref, leaves, index, dy, SWIGLU, torch.float64)
    x, weights = (t.float().to(dev).requires_grad_() for t in leaves[:2])
    gate_up, down = (t.float().to(dev) for t in leaves[2:])
    y = moe_experts(x, index.to(dev), weights, gate_up, down, backend=backend)
    y.backward(dy.float().to(dev))
    assert gate_up.grad is None and down.grad is None
    for out, ref in zip((y.detach(), x.grad, weights.grad), exact[:3], strict=True):
        assert_fp32_close(out.cpu(), ref, 1e-4)
    with torch.no_grad():
        y = moe_experts(x, index.to(dev), weights, gate_up, down, backend=backend)
    assert_fp32_close(y.cpu(), exact[0], 1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_no_tokens(backend):
    dev = device_for(backend)
    leaves, index, dy = _case(GPT_OSS, 0, 8, 4, 3, 2, "random", bias=True)
    got = _run(lambda *a: moe_experts(*a, backend=backend), leaves, index, dy, GPT_OSS, torch.float32, dev)
    assert got[0].shape == (0, 8) and got[1].shape == (0, 8) and got[2].shape == (0, 2)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(got[3:], leaves[2:], strict=True))


def test_routing_is_sorted_by_expert_on_the_device():
    index = torch.tensor([[2, 0], [0, 1], [2, 1]])
    routing = route_to_experts(index, 4)
    assert routing.expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert routing.ends.tolist() == [2, 4, 6, 6]  # expert 3 empty
    assert routing.token.tolist() == [0, 1, 1, 2, 0, 2]  # stable: token order within an expert
    assert torch.equal(routing.order[routing.position], torch.arange(6))


@pytest.mark.parametrize("fix, message", [
    (lambda a: a.update(x=a["x"][:, :-1]), "are not [E, 2I, H] and [E, H, I]"),
    (lambda a: a.update(top_k_index=a["top_k_index"] + 5), "must lie in [0, 5)"),
    (lambda a: a.update(top_k_weights=a["top_k_weights"][:, :1]), "top_k_weights [T, k]"),
    (lambda a: a.update(down_proj=a["down_proj"].double()), "must have x's dtype and device"),
    (lambda a: a.update(gate_up_bias=torch.zeros(5, 3)), "gate_up_bias must be [5, 12]"),
    (lambda a: a.update(top_k_index=a["top_k_index"].float()), "top_k_index must be integer"),
])
def test_bad_input_is_one_clear_error(fix, message):
    leaves, index, _ = _case(SWIGLU, 4, 10, 6, 5, 2, "random", bias=False)
    names = ("x", "top_k_weights", "gate_up_proj", "down_proj")
    args = dict(zip(names, (t.float() for t in leaves), strict=True), top_k_index=index)
    fix(args)
    with pytest.raises(ValueError, match=r"^moe_experts: ") as err:
        moe_experts(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


def _hf_experts(family: str, hidden: int, inter: int, experts: int, k: int):
    """transformers' own expert module of `family` (its eager forward), float64."""
    if family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssExperts

        config = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                              num_experts_per_tok=k, swiglu_limit=1.5)
        config._experts_implementation = "eager"
        return GptOssExperts(config).double(), gpt_oss_format(config.swiglu_alpha, config.swiglu_limit)
    classes = {"qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeExperts", "moe_intermediate_size", "num_experts"),
               "mixtral": ("MixtralConfig", "MixtralExperts", "intermediate_size", "num_local_experts"),
               "olmoe": ("OlmoeConfig", "OlmoeExperts", "intermediate_size", "num_experts")}
    config_name, experts_name, inter_key, experts_key = classes[family]
    module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=[experts_name])
    config = getattr(module, config_name)(hidden_size=hidden, num_experts_per_tok=k,
                                          **{inter_key: inter, experts_key: experts})
    config._experts_implementation = "eager"
    return getattr(module, experts_name)(config).double(), SWIGLU


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def test_equals_transformers_experts(family):
    """Layouts and activation exactly as transformers 5 stores and runs them (float64, 1e-10)."""
    pytest.importorskip("transformers")
    hidden, inter, experts, k, tokens = 12, 6, 5, 2, 11
    hf, fmt = _hf_experts(family, hidden, inter, experts, k)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=1.0)
    params = dict(hf.named_parameters())
    biases = ["down_proj_bias", "gate_up_proj_bias"] if family == "gpt_oss" else []
    assert sorted(params) == sorted(["down_proj", "gate_up_proj", *biases])
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)
    index = _top_k(tokens, experts, k, "random")
    dy = torch.randn(tokens, hidden, dtype=torch.float64)
    leaves = [x, weights, *params.values()]
    y = hf(x, index, weights)
    want = [y, *torch.autograd.grad(y, leaves, dy)]
    backends = ["torch"] + (["cpu"] if _dispatch.cpu_extension() is not None else [])
    for backend in backends:
        y = moe_experts(x, index, weights, params["gate_up_proj"], params["down_proj"],
                        params.get("gate_up_proj_bias"), params.get("down_proj_bias"), fmt, backend=backend)
        got = [y, *torch.autograd.grad(y, leaves, dy)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(_dispatch.cpu_extension() is None, reason="packtune._C not built")
def test_cpu_backend_compiles_without_graph_breaks():
    leaves, index, dy = _case(SWIGLU, 6, 16, 6, 4, 2, "random", bias=False)
    leaves = [t.float().requires_grad_() for t in leaves]

    def block(x, weights, gate_up, down):
        return moe_experts(x, index, weights, gate_up, down, backend="cpu")

    torch.compile(block, fullgraph=True)(*leaves).backward(dy.float())
    compiled = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    block(*leaves).backward(dy.float())
    for got, eager in zip(compiled, (t.grad for t in leaves), strict=True):
        torch.testing.assert_close(got, eager)
