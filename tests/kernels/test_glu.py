"""The gated activation act(gate) * up (silu: SwiGLU, gelu_tanh: GeGLU): every fused backend, and every
CPU vector width of the C++ kernel, against the float64 reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_checks import FUSED, assert_fp32_close, assert_low_precision_close, device_for

from packtune.kernels import SwiGLU, _dispatch, geglu, geglu_ref, glu, glu_ref, swiglu, swiglu_ref
from packtune.kernels.glu import ACTIVATIONS, glu_grad_ref

needs_cpu_extension = pytest.mark.skipif(_dispatch.cpu_extension() is None, reason="packtune._C not built")


def _fwd_bwd(fn, gate, up, dy):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


def _fused(activation, backend):
    return lambda a, b: glu(a, b, activation, backend=backend)


def _reference(activation):
    return lambda a, b: glu_ref(a, b, activation)


def _exact(activation, g, u, dy):
    return _fwd_bwd(_reference(activation), g.double(), u.double(), dy.double())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (2, 5, 2500), (4, 11008), (3, 2053)])
def test_fp32_matches_float64_reference(activation, backend, shape):
    dev = device_for(backend)
    g, u, dy = (torch.randn(shape, device=dev) * 4 for _ in range(3))
    got = _fwd_bwd(_fused(activation, backend), g, u, dy)
    exact = _exact(activation, g, u, dy)
    assert_fp32_close(got[0], exact[0], 1e-5)
    assert_fp32_close(got[1], exact[1], 1e-4)
    assert_fp32_close(got[2], exact[2], 1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", FUSED)
def test_extreme_gate_values(activation, backend):
    dev = device_for(backend)
    g = torch.tensor([[-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0]], device=dev)
    u, dy = torch.ones_like(g), torch.ones_like(g)
    got = _fwd_bwd(_fused(activation, backend), g, u, dy)
    exact = _exact(activation, g, u, dy)
    for out, ref in zip(got, exact, strict=True):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(activation, backend, dtype):
    dev = device_for(backend)
    g, u, dy = (torch.randn(6, 2100, device=dev).to(dtype) for _ in range(3))
    got = _fwd_bwd(_fused(activation, backend), g, u, dy)
    eager = _fwd_bwd(_reference(activation), g, u, dy)
    exact = _exact(activation, g, u, dy)
    for out, torch_out, ref in zip(got, eager, exact, strict=True):
        assert out.dtype == dtype
        assert_low_precision_close(out, torch_out, ref, backend)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", FUSED)
def test_halves_of_a_fused_projection(activation, backend):
    """gate and up as row-strided views of one [N, 2C] tensor, as a fused gate_up projection gives."""
    dev = device_for(backend)
    fused = torch.randn(9, 2 * 700, device=dev, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    glu(gate, up, activation, backend=backend).sum().backward()
    fused64 = fused.detach().double().requires_grad_()
    glu_ref(*fused64.chunk(2, dim=-1), activation).sum().backward()
    assert_fp32_close(fused.grad, fused64.grad, 1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_closed_form_gradient_is_the_references(activation):
    """glu_grad_ref (the torch backend's backward without autograd, the LoRA MLP's) in float64."""
    g, u, dy = (torch.randn(7, 300, dtype=torch.float64) * 4 for _ in range(3))
    _, dg, du = _fwd_bwd(_reference(activation), g, u, dy)
    closed_dg, closed_du = glu_grad_ref(dy, g, u, activation)
    torch.testing.assert_close(closed_dg, dg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed_du, du, rtol=1e-12, atol=1e-12)


_ISA_CHECK = textwrap.dedent("""
    import sys, torch
    import packtune._C as ext
    folder = sys.argv[1]
    g, u, dy = torch.load(f"{folder}/inputs.pt")
    for activation in ("silu", "gelu_tanh"):
        out = []
        for dtype in (torch.float32, torch.bfloat16):
            a, b, d = (t.to(dtype) for t in (g, u, dy))
            out.append(torch.ops.packtune.glu_fwd(a, b, activation))
            out += torch.ops.packtune.glu_bwd(d, a, b, activation)
        torch.save(out, f"{folder}/{activation}.pt")
    print(ext.cpu_capability())
""")


@needs_cpu_extension
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_cpu_vectors_match_the_reference(capability, tmp_path):
    """This machine runs the widest path it has (AVX-512 here); the AVX2 and portable 4-lane paths
    are the same template at other widths, run here in a process whose ATEN_CPU_CAPABILITY caps
    them: fp32 within the fp32 tolerances, bf16 no worse than PyTorch's own bf16."""
    g, u, dy = (torch.randn(3, 2053) * 4 for _ in range(3))
    g[0, :9] = torch.tensor([-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0])
    torch.save([g, u, dy], tmp_path / "inputs.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, "-P", "-c", _ISA_CHECK, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    levels = ["default", "avx2", "avx512"]
    widest = levels.index(_dispatch.cpu_extension().cpu_capability())
    assert proc.stdout.split()[-1] == levels[min(widest, levels.index(capability))]
    b16 = [t.to(torch.bfloat16) for t in (g, u, dy)]
    for activation in ACTIVATIONS:
        y, dg, du, y16, dg16, du16 = torch.load(tmp_path / f"{activation}.pt")
        exact = _exact(activation, g, u, dy)
        assert_fp32_close(y, exact[0], 1e-5)
        assert_fp32_close(dg, exact[1], 1e-4)
        assert_fp32_close(du, exact[2], 1e-4)
        eager = _fwd_bwd(_reference(activation), *b16)
        exact16 = _exact(activation, *b16)
        for out, torch_out, ref in zip((y16, dg16, du16), eager, exact16, strict=True):
            assert_low_precision_close(out, torch_out, ref, "cpu")


_HOPPER_COMPILE = textwrap.dedent("""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    glu = importlib.import_module("packtune.kernels.glu")
    lora_mlp = importlib.import_module("packtune.kernels.lora_mlp")

    def build(fn, pointers, scalars, constexprs, dtype):
        signature = {name: f"*{dtype}" for name in pointers}  # then pointers of other types, as scalars
        signature.update(scalars, **dict.fromkeys(constexprs, "constexpr"))
        return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    for activation in ("silu", "gelu_tanh"):
        strides = {"stride_g": "i64", "stride_u": "i64", "n_cols": "i32"}
        flags = {"ACTIVATION": activation, "BLOCK": 1024}
        build(glu._glu_fwd_kernel, ["G", "U", "Y"], strides, flags, "bf16")
        build(glu._glu_bwd_kernel, ["DY", "G", "U", "DG", "DU"], strides, flags, "bf16")
        tiles = {"R_TILE": 16, "BLOCK_N": 32, "BLOCK_C": 64, "ACTIVATION": activation, "UPCAST": False}
        sizes = {"n_rows": "i32", "n_cols": "i32", "rank": "i32"}
        build(lora_mlp._lora_gate_kernel, ["G", "U", "H", "UG", "UU", "BG", "BU"], {**sizes, "scale": "fp32"},
              tiles, "bf16")
        build(lora_mlp._lora_act_grad_kernel, ["DH", "DUP", "G", "U", "DUD", "AD"],
              {"DA": "*fp32", "SEED": "*i64", **sizes, "rows_per_split": "i32", "threshold": "i64",
               "p": "fp32"},
              {**tiles, "DROPOUT": True}, "bf16")
    print("compiled")
""")


def test_triton_kernels_compile_for_hopper():
    """The interpreter runs Triton code that the compiler may refuse (a float global read inside a jit
    function, for one): the gated kernels, and the LoRA MLP's that share act_and_grad, compiled to PTX
    for sm_90 by Triton's own compiler, which needs no GPU."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-P", "-c", _HOPPER_COMPILE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_aliases_module_and_errors():
    g, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(SwiGLU()(g, u), swiglu_ref(g, u))
    torch.testing.assert_close(swiglu(g, u, backend="torch"), glu_ref(g, u, "silu"))
    torch.testing.assert_close(geglu(g, u, backend="torch"), geglu_ref(g, u))
    torch.testing.assert_close(geglu_ref(g, u), torch.nn.functional.gelu(g, approximate="tanh") * u)
    with pytest.raises(ValueError, match="must match in shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation must be one of silu, gelu_tanh, got 'relu'"):
        glu(g, u, "relu")


@needs_cpu_extension
def test_cpu_op_names_a_bad_activation():
    g = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="packtune.glu: activation must be silu or gelu_tanh, got relu"):
        torch.ops.packtune.glu_fwd(g, g, "relu")
