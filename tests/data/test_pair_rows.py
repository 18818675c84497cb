"""One row per preference pair: the layout, and rewards and gradients equal to two separate sequences."""

from __future__ import annotations

import copy

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.data.pair_rows import pair_rows, shared_prefix
from llama2.model.heads import ScalarHeadModel
from llama2.stages.reward import PairExample, collate_pairs
from llama2.training.losses import reward_model_loss

PAD = 0


def test_a_row_holds_the_shared_prefix_once_and_hides_the_chosen_side_from_the_rejected_one():
    rows = pair_rows([[1, 5, 6, 7, 8]], [[1, 5, 6, 9]], [3], [3], PAD)
    assert rows["tokens"].tolist() == [[1, 5, 6, 7, 8, 9]]
    assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected id at the position it has alone
    assert rows["predictor"][0, 5] == 2 and rows["predictor"][0, 4] == 3  # 9 follows 6, not 8
    mask = rows["mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]
    assert torch.equal(mask[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
    assert rows["in_chosen"][0].tolist() == [False, False, False, True, True, False]
    assert rows["in_rejected"][0].tolist() == [False, False, False, False, False, True]
    assert (rows["chosen_last"].item(), rows["rejected_last"].item()) == (4, 5)
    # a rejected sequence that is a prefix of the chosen one adds nothing to the row
    prefix = pair_rows([[1, 5, 6, 7]], [[1, 5, 6]], [2], [2], PAD)
    assert prefix["tokens"].tolist() == [[1, 5, 6, 7]] and prefix["rejected_last"].item() == 2
    assert prefix["in_rejected"][0].tolist() == [False, False, True, False]
    assert shared_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and shared_prefix([1], [2]) == 0
    with pytest.raises(ValueError, match="as many rejected"):
        pair_rows([[1, 2]], [], [1], [], PAD)


def gated_rm(seed: int = 0) -> ScalarHeadModel:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=128)
    lm = Transformer(args)
    lm.init_weights(seed)
    rm = ScalarHeadModel.from_language_model(lm, likelihood_gate=True)
    gen = torch.Generator().manual_seed(seed)
    for p in (rm.score.weight, rm.likelihood_gate.weight):
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    return rm


def examples() -> list[PairExample]:
    """Pairs whose shared prefix ends in the prompt, inside the responses, at BOS only (prompts cut
    differently), and covers the whole rejected sequence; margins and safety labels of every kind."""
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 320, (n,), generator=gen).tolist()

    prompt, answer = [1, *ids(11)], ids(4)
    return [
        PairExample(prompt + ids(7), prompt + ids(5), 12, 12, 1.0, 1, 0),
        PairExample(prompt + answer + ids(3), prompt + answer + ids(6), 12, 12, 0.0, -1, -1),
        PairExample([1, *ids(9)], [1, *ids(14)], 5, 8, 2 / 3, 1, 1),
        PairExample(prompt + answer + ids(2), prompt + answer, 12, 12, 1 / 3, 0, 0),
    ]


def test_shared_rows_give_the_rewards_loss_and_gradients_of_separate_sequences():
    separate, shared = gated_rm(), gated_rm()
    shared.load_state_dict(copy.deepcopy(separate.state_dict()))
    pairs = examples()
    batches = collate_pairs(pairs, PAD), collate_pairs(pairs, PAD, shared_prompt=True)
    assert batches[1]["pairs"]["tokens"].numel() < batches[0]["tokens"].numel()
    rewards = (separate(batches[0]["tokens"], batches[0]["lengths"], batches[0]["starts"]),
               shared(batches[1]["pairs"]["tokens"], pairs=batches[1]["pairs"]))
    torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)
    losses = [reward_model_loss(m, b, safety_weight=0.5)[0] for m, b in zip((separate, shared), batches, strict=True)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (separate, shared)]
    assert grads[0].keys() == grads[1].keys() and "likelihood_gate.weight" in grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
