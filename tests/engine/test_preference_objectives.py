"""The preference objectives (packtune.preference.objectives): each loss's value and gradient against
a float64 reference written out here from the papers' formulas, and the step's loss and metrics as
micro-batch shares that add up to the whole step's."""

import math

import pytest
import torch

from packtune.config import PreferenceConfig
from packtune.preference.objectives import metric_names, pair_terms, step_loss


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def reference_loss(objective: str, cfg: PreferenceConfig, logps, counts, ref) -> float:
    """The step's loss in float64 Python arithmetic, one pair at a time, as the papers write it."""
    total, nll, chosen_tokens = 0.0, 0.0, 0
    for (lc, lr), (nc, nr), (rc, rr) in zip(logps, counts, ref, strict=True):
        if objective == "dpo":
            d = (lc - rc) - (lr - rr)
            eps = cfg.label_smoothing
            total += -(1 - eps) * _logsig(cfg.beta * d) - eps * _logsig(-cfg.beta * d)
        elif objective == "ipo":
            total += ((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * cfg.beta)) ** 2
        elif objective == "simpo":
            total += -_logsig(cfg.beta * lc / nc - cfg.beta * lr / nr - cfg.simpo_gamma)
        else:  # orpo: log odds of the per-token averages
            odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
            total += -cfg.orpo_lambda * _logsig(odds(lc / nc) - odds(lr / nr))
        nll += -lc
        chosen_tokens += nc
    weight = (objective == "orpo") + cfg.sft_weight
    return total / len(logps) + weight * nll / chosen_tokens


OBJECTIVES = {
    "dpo": PreferenceConfig(beta=0.3),
    "dpo-smoothed": PreferenceConfig(beta=0.3, label_smoothing=0.2, sft_weight=0.5),
    "ipo": PreferenceConfig(beta=0.2),
    "simpo": PreferenceConfig(beta=2.0, simpo_gamma=0.7),
    "orpo": PreferenceConfig(orpo_lambda=0.25, sft_weight=0.1),
}


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (n, 2), generator=g)
    logps = -(torch.rand(n, 2, generator=g, dtype=torch.float64) * 3 + 0.05) * counts
    ref = logps.detach() + torch.randn(n, 2, generator=g, dtype=torch.float64)
    return logps, counts, ref


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_loss_and_gradient_match_the_float64_reference(name):
    objective, cfg = name.split("-")[0], OBJECTIVES[name]
    logps, counts, ref = _pairs()
    logps.requires_grad_()
    num_pairs = torch.tensor(float(len(logps)), dtype=torch.float64)
    chosen = counts[:, 0].sum().double()
    loss, _ = step_loss(objective, cfg, logps, counts, ref, num_pairs, chosen)
    expected = reference_loss(objective, cfg, logps.tolist(), counts.tolist(), ref.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    step = 1e-6  # central differences of the reference, one log-prob at a time
    for p in range(len(logps)):
        for side in range(2):
            up, down = logps.detach().clone(), logps.detach().clone()
            up[p, side] += step
            down[p, side] -= step
            at = lambda x: reference_loss(objective, cfg, x.tolist(), counts.tolist(), ref.tolist())  # noqa: E731
            numeric = (at(up) - at(down)) / (2 * step)
            assert grad[p, side].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_micro_batch_shares_add_up_to_the_step(name):
    objective, cfg = name.split("-")[0], OBJECTIVES[name]
    logps, counts, ref = _pairs(n=7, seed=1)
    num_pairs, chosen = torch.tensor(7.0, dtype=torch.float64), counts[:, 0].sum().double()
    whole, whole_metrics = step_loss(objective, cfg, logps, counts, ref, num_pairs, chosen)
    parts = [step_loss(objective, cfg, logps[s], counts[s], ref[s], num_pairs, chosen)
             for s in (slice(0, 3), slice(3, 4), slice(4, 7))]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    torch.testing.assert_close(sum(p[1] for p in parts), whole_metrics)
    assert len(whole_metrics) == len(metric_names(objective, cfg))


def test_metrics_are_trl_s():
    """rewards = beta x log-ratio (DPO) or beta x average (SimPO); accuracy, margin and logps as TRL
    logs them."""
    logps = torch.tensor([[-4.0, -9.0], [-6.0, -3.0]], dtype=torch.float64)
    counts = torch.tensor([[2, 3], [3, 1]])
    ref = torch.tensor([[-5.0, -8.0], [-6.5, -3.0]], dtype=torch.float64)
    two = torch.tensor(2.0, dtype=torch.float64)
    _, m = step_loss("dpo", PreferenceConfig(beta=0.5), logps, counts, ref, two, torch.tensor(5.0))
    names = metric_names("dpo", PreferenceConfig())
    got = dict(zip(names, m.tolist(), strict=True))
    assert got == pytest.approx({"rewards/chosen": (0.5 + 0.25) / 2, "rewards/rejected": (-0.5 + 0) / 2,
                                 "rewards/accuracies": 1.0, "rewards/margins": (1.0 + 0.25) / 2,
                                 "logps/chosen": -5.0, "logps/rejected": -6.0})
    _, rewards, logged = pair_terms("simpo", PreferenceConfig(beta=2.0), logps, counts)
    torch.testing.assert_close(logged, logps / counts)
    torch.testing.assert_close(rewards, 2.0 * logps / counts)


def test_reference_objectives_need_reference_logps():
    logps, counts, _ = _pairs()
    with pytest.raises(ValueError, match="the dpo objective needs the reference log-probs"):
        pair_terms("dpo", PreferenceConfig(), logps, counts)
