"""Fixtures of the engine tests."""

import pytest

import packtune.integrations.lm_head as lm_head


@pytest.fixture
def counted(monkeypatch):
    """The reductions of packtune's fused linear cross-entropy calls at the LM head, in order."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("reduction"))
        return original(*args, **kwargs)

    original = lm_head.linear_cross_entropy
    monkeypatch.setattr(lm_head, "linear_cross_entropy", counting)
    return calls
