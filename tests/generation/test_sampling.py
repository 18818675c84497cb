import pytest
import torch

from llama2.generation.sampling import next_token, sample, sample_top_p


def test_greedy_at_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9]])
    assert next_token(logits, temperature=0).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_above_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_top_p(probs, 0.7, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 so the second token is needed, the third is not
    assert {int(sample_top_p(probs, 0.4, gen)) for _ in range(50)} == {0}


def test_top_k_and_seeded_sampling_are_reproducible():
    logits = torch.randn(4, 50)
    a = next_token(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = next_token(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top3 = logits.topk(3).indices
    assert all(int(a[i]) in top3[i].tolist() for i in range(4))


@pytest.mark.parametrize(("temperature", "top_p"), [(-1.0, 0.9), (1.0, 0.0), (1.0, 1.5)])
def test_invalid_sampling_settings(temperature, top_p):
    with pytest.raises(ValueError):
        next_token(torch.randn(1, 5), temperature, top_p)


def _nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's nucleus by a full sort: the renormalised probability of each token (0 outside it)."""
    ranked, ids = torch.sort(probs, descending=True)
    keep = (torch.cumsum(ranked, -1) - ranked) <= p
    out = torch.zeros_like(probs).scatter(-1, ids, ranked * keep)
    return out / out.sum(-1, keepdim=True)


# per row, the nucleus within the first 64 ranked tokens (sharpness 8) or past them (0.5: a full sort)
@pytest.mark.parametrize("sharpness", [(8.0, 8.0), (0.5, 0.5), (8.0, 0.5)])
def test_top_p_draws_follow_the_nucleus_of_a_full_sort(sharpness):
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(3)) * torch.tensor(sharpness)[:, None]
    probs = logits.softmax(-1)
    target = _nucleus(probs, 0.9)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_top_p(probs, 0.9, gen) for _ in range(4000)], dim=1)  # (2, 4000)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=300).float() / draws.shape[1]
        assert set(draws[row].tolist()) <= set(target[row].nonzero().flatten().tolist())
        assert (freq - target[row]).abs().max() < 0.03
        assert (int((target[row] > 0).sum()) > 64) == (sharpness[row] < 1)


def test_plain_sampling_follows_the_probabilities():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(4)) * torch.tensor([[0.5], [2.0], [8.0]])
    logits[:, 7] = float("-inf")  # a token of probability 0 is never drawn
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(probs, gen) for _ in range(4000)], dim=1)  # (3, 4000)
    for row in range(3):
        freq = torch.bincount(draws[row], minlength=200).float() / draws.shape[1]
        assert (freq - probs[row]).abs().max() < 0.03
        assert 7 not in draws[row].tolist()
    assert next_token(logits, 1.0, generator=torch.Generator().manual_seed(2)).shape == (3,)
