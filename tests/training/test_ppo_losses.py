"""PPO's pure pieces against hand-computed values: R_c gating, LOGIT, WHITEN, KL estimators, token rewards,
GAE against a direct sum, and the clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from llama2.stages.ppo import Scores, combine, score_reward
from llama2.training.ppo_losses import (
    gae,
    kl_penalty,
    logit,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_reward_gate_logit_and_whitening_by_hand():
    helpful = torch.tensor([0.9, 0.8, 0.7, 0.6])
    safety = torch.tensor([0.10, 0.95, 0.50, 0.30])  # row 0 below 0.15, row 2 a safety prompt
    is_safety = torch.tensor([False, False, True, False])
    combined = combine(Scores(helpful, safety), is_safety)
    assert combined.tolist() == pytest.approx([0.10, 0.8, 0.50, 0.6])
    assert combine(Scores(helpful, None), is_safety) is helpful
    assert combine(Scores(None, safety), is_safety) is safety
    with pytest.raises(ValueError):
        combine(Scores(None, None), is_safety)

    logits = [math.log(p / (1 - p)) for p in (0.10, 0.8, 0.50, 0.6)]
    assert logit(combined).tolist() == pytest.approx(logits, abs=1e-5)
    mean = sum(logits) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / 4)
    assert score_reward(combined).tolist() == pytest.approx([(x - mean) / std for x in logits], abs=1e-5)
    assert logit(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([-9.2103, 9.2103], abs=1e-3)

    masked = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]))
    assert masked[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_kl_estimators_and_token_rewards_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    r = [0.5, -1.0, 0.0]  # log π − log π0
    assert kl_penalty(lp, ref, "k1")[0].tolist() == pytest.approx(r)
    assert kl_penalty(lp, ref, "k2")[0].tolist() == pytest.approx([0.5 * x * x for x in r])
    assert kl_penalty(lp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-x) - 1 + x for x in r])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")

    kl = torch.tensor([[9.0, 0.5, -1.0, 0.0], [9.0, 9.0, 2.0, 9.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, False]])
    rewards = token_rewards(torch.tensor([3.0, -2.0]), kl, mask, beta=0.1)
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 3.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([0.0, 0.0, -0.2 - 2.0, 0.0])


def test_gae_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=gen)
    values = torch.randn(3, 7, generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 0:3] = True
    mask[2, 4:5] = True
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        pos = mask[b].nonzero().flatten().tolist()
        end = pos[-1]
        for t in pos:
            expected = 0.0
            for k in range(t, end + 1):
                next_v = values[b, k + 1].item() if k + 1 <= end else 0.0
                delta = rewards[b, k].item() + gamma * next_v - values[b, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + values[b, t].item(), abs=1e-5)
        assert adv[b][~mask[b]].abs().sum() == 0 and ret[b][~mask[b]].abs().sum() == 0


def test_clipped_policy_and_value_losses_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios 1.5, 0.5, 1.1, (masked)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): A=1,r=1.5 → max(-1.5,-1.2) = -1.2 (clipped); A=-1,r=0.5 → max(0.5, 0.8) = 0.8
    # (clipped); A=2, r=1.1 → -2.2 (inside the clip range)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert stats["approx_kl"] == pytest.approx(sum(0.5 * x * x for x in logs) / 3)

    v_loss, v_stats = value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]),
                                 torch.tensor([[2.0, 1.0]]), torch.tensor([[True, True]]), clip=0.2)
    # row 0: max((1-2)², (0.2-2)²) = 3.24 (clipped); row 1: max(1, 1) = 1
    assert v_loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert v_stats["value_clip_fraction"] == pytest.approx(0.5)
