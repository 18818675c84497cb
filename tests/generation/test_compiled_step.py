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
