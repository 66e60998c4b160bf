"""Checks and forms of the inputs every cross-entropy op shares (masked_cross_entropy,
linear_cross_entropy, and the log-prob ops built on them): options, per-row weights, labels in range.

A label outside [0, V) other than ignore_index must never reach the Triton kernel, which would read
logits[row, label] out of bounds: on CPU tensors (the interpreter) the first bad label is named, on
the GPU a device-side assert stops the step without a host sync.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_options(labels, weights, reduction, label_smoothing, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose from {REDUCTIONS}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap} must be positive (or None)")
    if weights is not None and (not weights.dtype.is_floating_point or weights.numel() != labels.numel()):
        raise ValueError(f"weights {weights.dtype} {tuple(weights.shape)} must be floating point with one "
                         f"weight per label ({labels.numel()})")


def flat_weights(weights: torch.Tensor | None, device) -> torch.Tensor | None:
    """The weights as the kernels read them: fp32 [N], contiguous, on `device` (None stays None)."""
    if weights is None:
        return None
    return weights.reshape(-1).to(device=device, dtype=torch.float32, non_blocking=True).contiguous()


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab: int, backend: str) -> None:
    """Reject labels outside [0, vocab) other than ignore_index before the Triton kernel reads
    logits[row, label] out of bounds. The C++ op checks its own labels and the torch reference's
    gather raises, so only the triton backend needs this: on CPU tensors (the interpreter) the
    first bad label is named; on the GPU a device-side assert (no host sync) stops the step."""
    if backend != "triton":
        return
    if labels.device.type == "cpu":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"label {int(labels[i])} at row {i} is outside the vocabulary [0, {vocab})")
    else:
        assert_labels_in_range(labels, ignore_index, vocab)


def assert_labels_in_range(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """A device-side assert: the labels are ignore_index or in [0, vocab). Asynchronous on CUDA: a bad
    label fails the step at the next sync (the metrics flush), as a CUDA device-side assert."""
    ok = ((labels == ignore_index) | ((labels >= 0) & (labels < vocab))).all()
    torch._assert_async(ok, f"packtune: a label is outside the vocabulary [0, {vocab}) and is not "
                            f"ignore_index ({ignore_index})")
