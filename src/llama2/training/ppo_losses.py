"""PPO's pure pieces (SPEC §8), each a function of tensors with no model, optimizer or I/O.

The reward of a rollout follows Llama 2 (Touvron et al. 2023, §3.2.3, after Stiennon et al. 2020):

    R(g|p) = WHITEN(LOGIT(R_c(g|p))) − β · KL(π_θ(g|p) ‖ π_0(g|p))

with the score added at the last response token and the KL charged per token. Advantages use GAE (Schulman
et al. 2016), the policy and value losses PPO's clipped objectives (Schulman et al. 2017). Every tensor over
tokens is laid out by *action position*: index `j` of a (B, T−1) tensor is the prediction of token `j+1`
from the logits at position `j`, and `mask` marks the positions whose predicted token is a response token.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
LOGIT_EPS = 1e-4
"""Scores are clamped to [ε, 1−ε] before LOGIT, so a judge's exact 0 or 1 maps to ±9.2, not ±∞."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is True (0 if there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def logit(p: torch.Tensor, eps: float = LOGIT_EPS) -> torch.Tensor:
    """LOGIT, the inverse sigmoid: undoes the sigmoid of sigmoid-scale RM scores (SPEC §8)."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over all of `x` (or its masked positions), population std.

    PPO whitens the scores over the batch of rollouts of one iteration: the paper leaves the statistics open
    (SPEC §8), and the batch is the only set every score of an update shares. Advantages are whitened the
    same way over all response tokens of the batch.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_0) from the sampled token's log-probs (Schulman, "Approximating KL").

    With `log r = log π_θ(a) − log π_0(a)` and `a ~ π_θ`: k1 = log r (unbiased, can be negative per token and
    even summed), k2 = ½ (log r)² (biased, ≥ 0), k3 = exp(−log r) − 1 + log r (unbiased, ≥ 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row (B,); rows must have at least one."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards (B, T−1): −β·KL on every response token, plus the sequence score on the last one."""
    rewards = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_positions(mask)] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) → (advantages, returns), both (B, T−1).

    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}; the episode ends after the last response token,
    so V and A beyond it are 0. Returns = A + V are the value function's targets. Masked positions are 0.
    """
    maskf = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * maskf[:, t]
        next_value = values[:, t] * maskf[:, t]
        next_adv = advantages[:, t]
    return advantages, (advantages + values) * maskf


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise, mean over response tokens.

    Stats: `clip_fraction` (tokens where the clipped branch was taken) and `approx_kl`, ½·mean((log r)²)
    between the policy now and the one that sampled the rollouts (how far the epochs have moved it).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: ½·max((V − R)², (clip(V, V_old ± ε) − R)²), mean over response tokens.

    Clipping the value around the rollout-time estimate keeps the value function, like the policy, from
    moving far on one batch (as in OpenAI's baselines and the Stiennon et al. code).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": float(masked_mean((clipped > unclipped).float(), mask))}
    return loss, stats


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax of `logits` (..., V) → (...), in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs at action positions: logits (B, T, V), tokens (B, T) → log π(tokens[:, j+1]) (B, T−1).

    Computed as −cross_entropy of fp32 logits, the same expression the generator records, so the two agree
    to rounding for the same model and tokens.
    """
    return -torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                                              reduction="none")
