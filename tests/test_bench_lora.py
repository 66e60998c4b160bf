"""The LoRA benchmark's steps run at tiny shapes (eager PEFT and packtune; compile is slow)."""

import pytest

from packtune.bench import lora

pytest.importorskip("peft")


@pytest.mark.parametrize("impl", ["peft", "packtune"])
@pytest.mark.parametrize("op", ["linear", "mlp"])
def test_bench_lora_step_runs(impl, op):
    step = lora.make_step(impl, {"op": op, "T": 6, "hidden": 16, "inter": 40, "rank": 4}, "float32", "cpu")
    step()
    step()


def test_fused_mlp_saves_half_of_peft_activations():
    shape = {"op": "mlp", "T": 64, "hidden": 32, "inter": 96, "rank": 4}
    assert lora.saved_bytes("packtune", shape) <= 0.55 * lora.saved_bytes("peft", shape)
