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


@pytest.mark.parametrize("kv_heads", [6, 2])
def test_one_query_attention_equals_sdpa(kv_heads):
    from llama2.generation.compiled_step import one_query_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 8, generator=gen)
    k, v = torch.randn(2, kv_heads, 10, 8, generator=gen), torch.randn(2, kv_heads, 10, 8, generator=gen)
    mask = torch.rand(2, 1, 1, 10, generator=gen) > 0.4
    mask[:, ..., 0] = True  # no row without a key
    gqa = kv_heads != 6
    for m in (mask, mask[:1], None):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
        torch.testing.assert_close(one_query_attention(q, k, v, attn_mask=m, enable_gqa=gqa), want)
    if gqa:
        with pytest.raises(ValueError, match="enable_gqa"):
            one_query_attention(q, k, v)


@pytest.mark.slow
def test_each_compiled_step_runs_its_own_model_and_sees_weight_updates():
    """Steps skip guards on their model's parameters: one model's step must never run for another model of
    the same shape, and an in-place update of the weights (an optimizer step) must reach the compiled step.
    Each step compiles its own code: with a recompile limit of 1, the two batched steps of one model here
    would fail if they shared one."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
    models = []
    for seed in (0, 1):
        model = Transformer(args)
        model.init_weights(seed=seed)
        with torch.no_grad():
            model.output.weight.mul_(8.0)
        models.append(model.eval())
    with torch._dynamo.config.patch(recompile_limit=1):
        for prompts in ([[1, 5, 9, 17, 33]], [[1, 5, 9, 17, 33], [1, 7, 2]], [[1, 5], [1, 7, 2], [1, 3, 4, 8]]):
            for model in models * 2:
                eager = generate(model, prompts, 12, stop_ids=[], temperature=0).tokens
                assert generate(model, prompts, 12, stop_ids=[], temperature=0, compile=True).tokens == eager
    prompt = [[1, 5, 9, 17, 33]]
    first = models[0]
    before = generate(first, prompt, 12, stop_ids=[], temperature=0, compile=True).tokens
    with torch.no_grad():
        first.output.weight.copy_(models[1].output.weight)
    after = generate(first, prompt, 12, stop_ids=[], temperature=0, compile=True).tokens
    assert after != before and after == generate(first, prompt, 12, stop_ids=[], temperature=0).tokens
