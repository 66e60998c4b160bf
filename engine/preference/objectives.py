"""The preference objectives, per pair, from the policy's response log-probs (and the reference's).

For pair p with response log-probs summed over its label tokens, l_c and l_r (policy), r_c and r_r
(reference), and label-token counts n_c and n_r (averages a_c = l_c / n_c, a_r = l_r / n_r):

    dpo    loss_p = -(1 - eps) log sigmoid(beta D) - eps log sigmoid(-beta D),
           D = (l_c - r_c) - (l_r - r_r)                       (Rafailov et al. 2023; eps: cDPO)
    ipo    loss_p = ((l_c - r_c) / n_c - (l_r - r_r) / n_r - 1 / (2 beta))^2
                                                                (Azar et al. 2023, eq. 17, per token)
    simpo  loss_p = -log sigmoid(beta a_c - beta a_r - gamma)    (Meng et al. 2024, eq. 6)
    orpo   loss_p = -lambda log sigmoid(log odds(a_c) - log odds(a_r)),
           log odds(a) = a - log(1 - exp(a))                   (Hong et al. 2024, eqs. 4-7)

The step's loss is the mean of loss_p over the step's pairs plus w times the NLL of the chosen
responses, a token mean over the step's chosen label tokens: w = 1 for ORPO (its L_SFT), plus
`sft_weight` for any objective (RPO's alpha). Both means are global (every micro-batch and rank of
the step): each micro-batch divides its sums by the step's pair count and chosen-token count.

As TRL computes them (huggingface/trl at f2cd57710ae345ea6428ae95363267fcf38a3dc8):
trl/trainer/dpo_trainer.py lines 1434-1435 (sigmoid: `-F.logsigmoid(self.beta * delta_score)`),
1499-1503 (the label-smoothed sigmoid, `aot`'s form, which is cDPO), 1440-1451 (ipo: the token-
averaged log-ratios, `(ipo_delta - 1 / (2 * self.beta)) ** 2`) and 1634-1653 (rewards = beta x the
log-ratios, their accuracy and margin, logps = summed); trl/experimental/cpo/cpo_trainer.py lines
714-721 (simpo: `logits - simpo_gamma / beta` under `-F.logsigmoid(beta * logits)`, the log-probs
averaged, line 849) and 741-746 (rewards = beta x the averages); trl/experimental/orpo/
orpo_trainer.py lines 88-92 (log1mexp), 694-700 (the log odds, `self.beta * logsigmoid`, beta
being ORPO's lambda) and 851 (`policy_nll_loss - losses.mean()`). TRL averages per micro-batch;
here the means span the whole step.

The logged metrics follow TRL's names and values: rewards/chosen and rewards/rejected (beta x the
log-ratios for DPO and IPO; beta x the average log-probs for SimPO, lambda x them for ORPO),
rewards/accuracies (share of pairs with the chosen reward above the rejected one), rewards/margins,
logps/chosen and logps/rejected (summed for DPO and IPO, averaged for SimPO and ORPO), each a mean
over the step's pairs; and nll_loss (the chosen responses' token-mean NLL) where the loss has it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from packtune.config import PreferenceConfig

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def nll_weight(objective: str, cfg: PreferenceConfig) -> float:
    """The weight of the chosen responses' token-mean NLL in the step's loss."""
    return (1.0 if objective == "orpo" else 0.0) + cfg.sft_weight


def metric_names(objective: str, cfg: PreferenceConfig) -> tuple[str, ...]:
    return METRICS + (("nll_loss",) if nll_weight(objective, cfg) else ())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_terms(objective: str, cfg: PreferenceConfig, logps: torch.Tensor, counts: torch.Tensor,
               ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_p `[P]`, rewards `[P, 2]`, logged log-probs `[P, 2]`) of pairs with summed log-probs
    `logps` `[P, 2]` (chosen, rejected), label-token counts `counts` `[P, 2]` and, for DPO and IPO,
    the reference's `ref_logps` `[P, 2]`. Computed in logps' dtype."""
    beta = cfg.beta
    if objective in ("dpo", "ipo"):
        if ref_logps is None:
            raise ValueError(f"the {objective} objective needs the reference log-probs")
        ratios = logps - ref_logps.to(logps.dtype)
        rewards = beta * ratios.detach()
        if objective == "dpo":
            delta = ratios[:, 0] - ratios[:, 1]
            eps = cfg.label_smoothing
            loss = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        else:
            per_token = ratios / counts.to(logps.dtype).clamp(min=1)
            loss = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
        return loss, rewards, logps.detach()
    average = logps / counts.to(logps.dtype).clamp(min=1)
    if objective == "simpo":
        loss = -F.logsigmoid(beta * (average[:, 0] - average[:, 1]) - cfg.simpo_gamma)
        return loss, beta * average.detach(), average.detach()
    if objective == "orpo":
        log_odds = (average[:, 0] - average[:, 1]) - (log1mexp(average[:, 0]) - log1mexp(average[:, 1]))
        loss = -cfg.orpo_lambda * F.logsigmoid(log_odds)
        return loss, cfg.orpo_lambda * average.detach(), average.detach()
    raise ValueError(f"unknown preference objective {objective!r}")


def step_loss(objective: str, cfg: PreferenceConfig, logps: torch.Tensor, counts: torch.Tensor,
              ref_logps: torch.Tensor | None, num_pairs: torch.Tensor, num_chosen_tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(this micro-batch's share of the step's loss, its share of each metric in `metric_names`): sums
    over its pairs divided by the step's `num_pairs` (the NLL by `num_chosen_tokens`), so that the
    shares of every micro-batch and rank add up to the step's values. Device tensors, no host sync."""
    loss_p, rewards, logged = pair_terms(objective, cfg, logps, counts, ref_logps)
    loss = loss_p.sum() / num_pairs
    chosen_nll = -logps[:, 0].sum() / num_chosen_tokens
    weight = nll_weight(objective, cfg)
    if weight:
        loss = loss + weight * chosen_nll
    stats = [rewards[:, 0].sum(), rewards[:, 1].sum(), (rewards[:, 0] > rewards[:, 1]).to(logps.dtype).sum(),
             (rewards[:, 0] - rewards[:, 1]).sum(), logged[:, 0].sum(), logged[:, 1].sum()]
    stats = torch.stack(stats) / num_pairs
    if weight:
        stats = torch.cat([stats, chosen_nll.detach()[None]])
    return loss, stats
