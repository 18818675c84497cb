"""The compiled decoding step (CPU fast path) gives the eager generator's tokens and is compiled once per shape."""

from __future__ import annotations

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_reuses_its_step():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=128)
    model = Transformer(args)
    model.init_weights(seed=0)
    with torch.no_grad():  # peaked logits, so that greedy choices are not near-ties
        model.output.weight.mul_(8.0)
    model.eval()
    prompts = [[1, 5, 9, 17, 33], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    eager = generate(model, prompts, 24, stop_ids=[], temperature=0).tokens
    compiled = generate(model, prompts, 24, stop_ids=[], temperature=0, compile=True).tokens
    assert compiled == eager
    again = generate(model, prompts, 24, stop_ids=[], temperature=0, compile=True).tokens
    assert again == eager
    assert len(model._decode_steps) == 1  # same batch size and cache length: the same compiled step



@pytest.mark.slow
def test_one_sequence_step_gives_the_forward_logits_and_tokens():
    """Batch 1 computes every linear layer as a reduction: the same logits (to float rounding) and tokens."""
    from llama2.generation.compiled_step import _one_row_forward

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=1)
    with torch.no_grad():
        model.output.weight.mul_(8.0)
    model.eval()
    tokens = torch.tensor([[17]])
    with torch.inference_mode():
        got = _one_row_forward(model)(tokens, None, None, None)
        want = model(tokens)
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 1, 128)
    assert not torch.equal(got, want), "summed in another order than the BLAS: not bit-identical"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)

    prompt = [[1, 5, 9, 17, 33, 2, 8]]
    eager = generate(model, prompt, 20, stop_ids=[], temperature=0).tokens
    assert generate(model, prompt, 20, stop_ids=[], temperature=0, compile=True).tokens == eager
    assert 1 in {key[1] for key in model._decode_steps}, "a one-sequence step was compiled"
