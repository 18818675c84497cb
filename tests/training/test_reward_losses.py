"""Reward-model losses against hand-computed values (SPEC §7 Table 27 margins, Llama 2 eq. 2)."""

from __future__ import annotations

import math

import pytest
import torch

from llama2.training.losses import preference_loss, rating_margin, reward_model_loss, safety_auxiliary_loss

TABLE_27 = {  # rating: (none, small, large)
    "significantly_better": (0.0, 1.0, 3.0),
    "better": (0.0, 2 / 3, 2.0),
    "slightly_better": (0.0, 1 / 3, 1.0),
    "negligibly_better": (0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("rating", list(TABLE_27))
@pytest.mark.parametrize("mode", ["none", "small", "large"])
def test_margin_loss_matches_hand_computed_values(rating, mode):
    m = TABLE_27[rating][("none", "small", "large").index(mode)]
    assert rating_margin(rating, mode) == pytest.approx(m)
    chosen, rejected = 1.5, 0.25
    expected = -math.log(1 / (1 + math.exp(-(chosen - rejected - m))))
    loss, metrics = preference_loss(torch.tensor([chosen]), torch.tensor([rejected]), torch.tensor([m]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == 1.0 and metrics["reward_margin"].item() == pytest.approx(1.25)


def test_unrated_pairs_get_no_margin_and_unknown_modes_fail():
    assert rating_margin(None, "large") == 0.0
    with pytest.raises(ValueError, match="margin mode"):
        rating_margin("better", "huge")


def test_loss_is_a_mean_over_pairs_and_accuracy_counts_ties_half():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0, 0.5])
    margin = torch.tensor([1.0, 0.0, 0.0, 1 / 3])
    loss, metrics = preference_loss(chosen, rejected, margin)
    by_hand = [math.log(1 + math.exp(-(c - r - m))) for c, r, m in zip([2, 0, -1, 0.5], [1, 0, 1, 0.5],
                                                                        [1, 0, 0, 1 / 3], strict=True)]
    assert loss.item() == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert metrics["reward_margin"].item() == pytest.approx((1 + 0 - 2 + 0) / 4)


def test_safety_auxiliary_loss_is_bce_on_labelled_responses_only():
    rewards = torch.tensor([2.0, -1.0, 0.3, 5.0])
    safe = torch.tensor([1, 0, -1, 0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(5.0))) / 3
    assert safety_auxiliary_loss(rewards, safe).item() == pytest.approx(expected, rel=1e-6)
    none = safety_auxiliary_loss(rewards.requires_grad_(), torch.full((4,), -1))
    assert none.item() == 0.0 and none.requires_grad


class FixedRewards(torch.nn.Module):
    """Returns preset rewards, so the LossFn's batch handling is checked without a transformer."""

    def __init__(self, rewards: list[float]):
        super().__init__()
        self.rewards = torch.nn.Parameter(torch.tensor(rewards))

    def forward(self, tokens, lengths, starts):
        return self.rewards[: tokens.shape[0]]


def test_reward_model_loss_splits_chosen_then_rejected_and_adds_the_weighted_auxiliary_term():
    model = FixedRewards([1.0, 0.0, -0.5, 0.5])  # chosen 1.0, 0.0; rejected -0.5, 0.5
    batch = {"tokens": torch.zeros(4, 3, dtype=torch.long), "lengths": torch.tensor([3, 2, 3, 1]),
             "starts": torch.tensor([1, 1, 1, 1]),
             "margin": torch.tensor([1.0, 0.0]), "safe": torch.tensor([1, -1, 0, -1])}
    plain, metrics = reward_model_loss(model, batch)
    expected = (math.log(1 + math.exp(-(1.5 - 1.0))) + math.log(1 + math.exp(0.5))) / 2
    assert plain.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == 0.5 and metrics["tokens"] == 12.0
    with_aux, metrics = reward_model_loss(model, batch, safety_weight=0.5)
    aux = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.5))) / 2
    assert metrics["safety_loss"].item() == pytest.approx(aux, rel=1e-6)
    assert with_aux.item() == pytest.approx(expected + 0.5 * aux, rel=1e-6)
