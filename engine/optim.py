"""AdamW, the warmup + cosine learning-rate schedule, and gradient clipping over sharded grads."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all parameters, CPU and CUDA, DTensors included).

    Fused also matters for the NaN guard: it honours `optimizer.found_inf`, a device tensor
    that skips the update (and its step count) without a host sync. Norms and biases (1-D
    parameters) get no weight decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """lr multiplier at step s: linear from 1/(warmup+1) up to 1, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup: float, total_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """`warmup` < 1 is a fraction of the total steps (rounded up), otherwise a number of steps."""
    warmup_steps = math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)
    return LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total L2 norm of all gradients (across ranks when they are FSDP DTensor shards), then clip.

    Returns the pre-clipping norm as a plain device tensor; no host sync. `max_norm <= 0` only
    measures. A non-finite norm leaves the gradients alone (clipping by norm 0 is a factor of 1;
    the step is skipped anyway): clipping by inf would zero them, by NaN poison them.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: the local squares still have to be summed
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.where(norm.isfinite(), norm, 0.0),
                                          foreach=True)
    return norm
