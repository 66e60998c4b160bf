"""Triton launches on the tensors' CUDA device, not the current one (a `cuda:1` input launched
under device 0 reads another GPU's memory). The launches themselves need a GPU (tests/gpu has the
two-GPU check); here every launcher is seen to enter `launch_device` with its input's device,
through the interpreter, and `launch_device` to make a CUDA tensor's device current."""

import contextlib
import importlib
import types

import torch

from packtune.kernels import _dispatch, geglu, masked_cross_entropy, rms_norm, rope_cos_sin, rotary, swiglu

# the op modules (packtune.kernels re-exports functions under the modules' names)
MODULES = [importlib.import_module(f"packtune.kernels.{name}")
           for name in ("rms_norm", "rotary", "glu")]


def test_every_triton_launcher_enters_the_inputs_device(monkeypatch):
    seen = []

    def recording(tensor):
        seen.append(tensor.device)
        return contextlib.nullcontext()

    for module in (_dispatch, *MODULES):
        monkeypatch.setattr(module, "launch_device", recording)
    x = torch.randn(6, 32, requires_grad=True)
    masked_cross_entropy(x, torch.tensor([1, 2, -100, 3, 4, 5]), backend="triton").backward()
    assert len(seen) == 1
    rms_norm(x, torch.ones(32, requires_grad=True), backend="triton").sum().backward()
    assert len(seen) == 3
    swiglu(x, x.detach() * 2, backend="triton").sum().backward()
    assert len(seen) == 5
    q, k = torch.randn(6, 2, 16, requires_grad=True), torch.randn(6, 1, 16, requires_grad=True)
    cos, sin = rope_cos_sin(1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16), 8)
    qo, ko = rotary(q, k, cos, sin, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), backend="triton")
    (qo.sum() + ko.sum()).backward()
    assert len(seen) == 7
    geglu(x, x.detach() * 2, backend="triton").sum().backward()
    assert len(seen) == 9
    assert all(d == torch.device("cpu") for d in seen)


def test_launch_device_makes_a_cuda_tensors_device_current(monkeypatch):
    entered = []
    enter = lambda device: entered.append(device) or contextlib.nullcontext()
    monkeypatch.setattr(torch.cuda, "device", enter)
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    with _dispatch.launch_device(fake):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _dispatch.launch_device(torch.zeros(1)):  # CPU tensors (the interpreter): nothing to switch
        pass
    assert len(entered) == 1
