"""The screened greedy token is the fp32 argmax whenever it says it is proven, and says so almost always."""

from __future__ import annotations

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate
from llama2.generation.screened_argmax import BLOCK, BLOCKS, ScreenedOutput, int8_logits, screened_argmax


def _pick(weight: torch.Tensor, h: torch.Tensor, screen: ScreenedOutput | None = None) -> tuple[int, bool]:
    screen = screen or ScreenedOutput(weight)
    screen.refresh()
    token, proven = screened_argmax(h, weight, screen.packed, screen.scale, screen.slack)
    return int(token), bool(proven)


def test_estimates_stay_within_their_bounds():
    """Odd sizes too: columns padded to the packing's multiple of 32, a vocabulary that is not whole blocks."""
    gen = torch.Generator().manual_seed(5)
    for vocab, dim in ((3000, 64), (1001, 50), (700, 288)):
        weight = torch.randn(vocab, dim, generator=gen) * 0.05
        weight[3, 7] = 4.0  # an outlier coarsens its row's scale: a wide bound, still a bound
        screen = ScreenedOutput(weight)
        for _ in range(5):
            h = torch.randn(dim, generator=gen) * 3
            gap = (int8_logits(h, screen.packed, screen.scale) - (weight.double() @ h.double())).abs()
            bound = screen.slack.double() * h.double().norm()
            assert (gap <= bound).all()
            assert gap.max() > 0.01 * bound.median()  # an estimate, not the exact logits
            assert bound[3] > 10 * bound.median()


def test_proven_tokens_are_the_fp32_argmax():
    gen = torch.Generator().manual_seed(0)
    proven_count = 0
    for trial in range(200):
        scale = [0.02, 0.1, 1.0][trial % 3]
        weight = torch.randn(8000, 64, generator=gen) * scale
        h = torch.randn(64, generator=gen) * (1 + trial % 5)
        token, proven = _pick(weight, h)
        if proven:
            proven_count += 1
            assert token == int((weight @ h).argmax())
    assert proven_count >= 190


def test_ties_go_to_the_lowest_id_and_crowds_are_not_proven():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5000, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen)
    best = int((weight @ h).argmax())
    weight[[7, 4000]] = weight[best].clone()  # exact ties with the best row, in other blocks
    token, proven = _pick(weight, h)
    assert proven and token == int((weight @ h).argmax()) == min(7, best)

    crowd = torch.arange(BLOCKS + 1) * BLOCK + 1  # one tied row in more blocks than are recomputed
    weight[crowd] = weight[best].clone()
    assert not _pick(weight, h)[1]


def test_near_ties_below_int8_resolution_are_decided_in_fp32():
    """Two rows that int8 stores alike: the screen must recompute both, and the fp32 one that wins, wins."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3000, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen).abs()
    best = int((weight @ h).argmax())
    weight[2900] = weight[best] * (1 + 1e-4)  # the same codes, a little larger in fp32
    screen = ScreenedOutput(weight)
    assert torch.equal(screen.packed[2900].view(torch.int32), screen.packed[best].view(torch.int32))
    assert _pick(weight, h, screen) == (2900, True)


def test_in_place_updates_and_non_finite_weights():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(4000, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen)
    screen = ScreenedOutput(weight)
    with torch.no_grad():
        weight[11] = weight[int((weight @ h).argmax())] * 1e6
    assert _pick(weight, h, screen) == (11, True)  # the version counter moved: new codes
    with torch.no_grad():
        weight[20, 3] = float("nan")
    assert not _pick(weight, h, screen)[1]


@pytest.mark.slow
def test_compiled_greedy_decoding_falls_back_where_the_screen_cannot_tell():
    """An output matrix of 4 distinct rows, each repeated through the vocabulary: every step's best logit is
    shared by rows in every block, the screen proves nothing, and the full logits decide. The greedy tokens are
    the eager generator's (compared by row group: a kernel may round identical rows differently)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=4)
    with torch.no_grad():
        model.output.weight.copy_(model.output.weight[torch.arange(256) % 4] * 8.0)
    model.eval()
    prompt = [[1, 5, 9, 17, 33]]
    eager = generate(model, prompt, 16, stop_ids=[], temperature=0).tokens[0]
    compiled = generate(model, prompt, 16, stop_ids=[], temperature=0, compile=True).tokens[0]
    assert [t % 4 for t in compiled] == [t % 4 for t in eager]
    (step,) = model._decode_steps.values()
    assert type(step).__name__ == "CompiledGreedyStep"
    assert step.fallbacks == 15  # every decoding step after the prefill's token
