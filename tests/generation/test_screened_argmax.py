"""The screened greedy token is the fp32 argmax whenever it says it is proven, and says so almost always."""

from __future__ import annotations

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate
from llama2.generation.screened_argmax import CANDIDATES, ScreenedOutput, screened_argmax


def _pick(weight: torch.Tensor, h: torch.Tensor) -> tuple[int, bool]:
    screen = ScreenedOutput(weight)
    token, proven = screened_argmax(h, weight, screen.half, screen.err)
    return int(token), bool(proven)


def test_proven_tokens_are_the_fp32_argmax():
    gen = torch.Generator().manual_seed(0)
    proven_count = 0
    for trial in range(200):
        scale = [0.02, 0.1, 1.0][trial % 3]
        weight = torch.randn(2000, 64, generator=gen) * scale
        h = torch.randn(64, generator=gen) * (1 + trial % 5)
        token, proven = _pick(weight, h)
        if proven:
            proven_count += 1
            assert token == int((weight @ h).argmax())
    assert proven_count >= 190


def test_ties_go_to_the_lowest_id_and_crowds_are_not_proven():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen)
    best = int((weight @ h).argmax())
    weight[[7, 300]] = weight[best].clone()  # exact ties with the best row
    token, proven = _pick(weight, h)
    assert proven and token == int((weight @ h).argmax()) == min(7, best)

    crowd = torch.arange(10, 10 + CANDIDATES + 1)
    weight[crowd] = weight[best].clone()  # more tied rows than candidates: the screen cannot tell
    assert not _pick(weight, h)[1]


def test_near_ties_below_fp16_resolution_are_decided_in_fp32():
    """Two rows that fp16 stores alike: the screen must recompute both, and the fp32 one that wins, wins."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen).abs()
    best = int((weight @ h).argmax())
    weight[5] = weight[best] * (1 + 1e-5)  # the same in fp16, a little larger in fp32
    assert torch.equal(weight[5].half(), weight[best].half())
    assert _pick(weight, h) == (5, True)


def test_weights_beyond_fp16_range_and_in_place_updates():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(400, 32, generator=gen) * 0.05
    h = torch.randn(32, generator=gen)
    screen = ScreenedOutput(weight)
    with torch.no_grad():
        weight[11] = weight[int((weight @ h).argmax())] * 1e6  # 1e6 * 0.05 overflows fp16
    screen.refresh()  # the version counter moved: a new fp16 copy
    token, proven = screened_argmax(h, weight, screen.half, screen.err)
    assert bool(proven) and int(token) == 11 == int((weight @ h).argmax())


@pytest.mark.slow
def test_compiled_greedy_decoding_falls_back_where_the_screen_cannot_tell():
    """An output matrix of 4 distinct rows, each repeated 32 times (more than the candidates): every step's
    best logit is shared by 32 rows, the screen proves nothing, and the full logits decide. The greedy tokens
    are the eager generator's (compared by row group: a kernel may round identical rows differently)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=4)
    with torch.no_grad():
        model.output.weight.copy_(model.output.weight[torch.arange(128) % 4] * 8.0)
    model.eval()
    prompt = [[1, 5, 9, 17, 33]]
    eager = generate(model, prompt, 16, stop_ids=[], temperature=0).tokens[0]
    compiled = generate(model, prompt, 16, stop_ids=[], temperature=0, compile=True).tokens[0]
    assert [t % 4 for t in compiled] == [t % 4 for t in eager]
    (step,) = model._decode_steps.values()
    assert step.fallbacks == 15  # every decoding step after the prefill's token
