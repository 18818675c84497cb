"""A prefix cache reuses an earlier prompt's keys and values: the next turn of a dialog prefills its new tokens
only, and gets the tokens and log-probs it would get with its whole history prefilled."""

from __future__ import annotations

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.generation.generator import GenerationOutput, generate, stream
from llama2.generation.prefix_cache import PrefixCache


def _model() -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=96)
    model = Transformer(args)
    model.init_weights(seed=5)
    with torch.no_grad():  # peaked logits, so that greedy choices are not near-ties
        model.output.weight.mul_(8.0)
    return model.eval()


def _generate_and_prefills(model: Transformer, prompts: list[list[int]], **kwargs
                           ) -> tuple[GenerationOutput, list[tuple[int, int]]]:
    """The output, and (rows, tokens per row) of each prefill pass: the passes before the decoding steps."""
    calls: list[tuple[int, int]] = []
    handle = model.norm.register_forward_pre_hook(lambda module, inputs: calls.append(tuple(inputs[0].shape[:2])))
    try:
        out = generate(model, prompts, stop_ids=[], temperature=0, logprobs=True, **kwargs)
    finally:
        handle.remove()
    return out, calls[: len(calls) - (kwargs["max_gen_len"] - 1)]


def _assert_same(cached: GenerationOutput, full: GenerationOutput) -> None:
    assert cached.tokens == full.tokens
    for lp, ref in zip(cached.logprobs, full.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_later_turns_prefill_only_their_new_tokens_and_match_a_full_prefill():
    model = _model()
    cache = PrefixCache()
    histories = [[1, 4, 9, 16, 25], [1, 2], [1, 50, 60, 70, 80, 90, 11]]
    for turn in range(3):
        cached, prefills = _generate_and_prefills(model, histories, max_gen_len=6, samples_per_prompt=2,
                                                  prefix_cache=cache, cache_keys=["a", "b", "c"])
        _assert_same(cached, generate(model, histories, 6, [], temperature=0, logprobs=True, samples_per_prompt=2))
        # turn 0 prefills whole prompts (7 and 5 tokens together, 2 apart: under half the longest); later turns
        # only the new reply and user tokens (4 + 3)
        assert prefills == ([(2, 7), (1, 2)] if turn == 0 else [(3, 7)])
        # the next turn: a reply that is not the sampled one (as when the chosen reply is re-encoded), a user turn
        histories = [h + [30 + turn, 31, 32, 33] + [5, 6, 7] for h in histories]


def test_a_changed_history_prefills_from_its_first_changed_token_apart_from_the_others():
    model = _model()
    cache = PrefixCache()
    first = [[1, 4, 9, 16, 25, 36, 49, 64, 81], [1, 40, 41, 42]]
    generate(model, first, 4, [], temperature=0, prefix_cache=cache, cache_keys=[0, 1])
    edited = [1, 4, 9, 77, 25, 36, 49, 64, 81, 3]  # changed at token 3
    extended = [1, 40, 41, 42, 43, 44]
    assert cache.reusable(0, edited) == 3 and cache.reusable(1, extended) == 4
    cached, prefills = _generate_and_prefills(model, [extended, edited], max_gen_len=4, prefix_cache=cache,
                                              cache_keys=[1, 0])
    _assert_same(cached, generate(model, [extended, edited], 4, [], temperature=0, logprobs=True))
    assert prefills == [(1, len(edited) - 3), (1, 2)]  # the edited dialog alone, then the other one's 2 tokens
    assert cache.reusable(0, edited) == len(edited) - 1  # the last token is always fed, for its logits


def test_a_prefix_cache_needs_one_key_per_prompt_and_no_echoed_logprobs():
    model = _model()
    cache = PrefixCache()
    with pytest.raises(ValueError, match="one key per prompt: 2 prompts, 1 keys"):
        generate(model, [[1, 2], [1, 3]], 2, [], prefix_cache=cache, cache_keys=[0])
    generate(model, [[1, 2, 3]], 2, [], prefix_cache=cache, cache_keys=[0])
    with pytest.raises(ValueError, match="echo with logprobs"):
        generate(model, [[1, 2, 3, 4]], 2, [], logprobs=True, echo=True, prefix_cache=cache, cache_keys=[0])


def test_streaming_a_conversation_prefills_each_turn_once():
    model = _model()
    cache = PrefixCache()
    history = [1, 4, 9, 16, 25]
    fed: list[int] = []
    handle = model.norm.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0].shape[1]))
    try:
        for turn in range(3):
            fed.clear()
            cached = list(stream(model, history, 6, [], temperature=0, prefix_cache=cache))
            prefilled = fed[0]
            assert cached == list(stream(model, history, 6, [], temperature=0))
            assert prefilled == (len(history) if turn == 0 else 2 + 3)  # the reply's 2 tokens and 3 new ones
            history = [*history, *cached[:2], 5, 6, 7]
    finally:
        handle.remove()
