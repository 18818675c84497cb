"""The left-padded ragged batch: rows are independent of their neighbours, prefilled in one pass, and each
row keeps its own context limit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate, generate_texts


def _model(max_seq_len: int = 64) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
                     max_seq_len=max_seq_len)
    model = Transformer(args)
    model.init_weights(seed=5)
    with torch.no_grad():  # peaked logits, so that greedy choices are not near-ties
        model.output.weight.mul_(8.0)
    return model.eval()


PROMPTS = [[1, 4, 9, 16, 25, 36, 49, 64, 81, 3, 5, 7], [1, 2], [1, 50, 60, 70, 80]]


def _reference_logprobs(model: Transformer, prompt: list[int], generated: list[int]) -> torch.Tensor:
    full = torch.tensor([prompt + generated])
    with torch.no_grad():
        return -F.cross_entropy(model(full)[0, :-1], full[0, 1:], reduction="none")


def test_each_row_of_a_ragged_batch_gets_its_tokens_and_logprobs_alone():
    model = _model()
    batch = generate(model, PROMPTS, 16, stop_ids=[], temperature=0, logprobs=True)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 16, stop_ids=[], temperature=0, logprobs=True)
        assert batch.tokens[i] == alone.tokens[0]
        ref = _reference_logprobs(model, prompt, batch.tokens[i])[len(prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(batch.logprobs[i]), ref, atol=1e-5, rtol=1e-5)


def test_echo_returns_each_prompt_without_padding_and_its_logprobs():
    model = _model()
    out = generate(model, PROMPTS, 6, stop_ids=[], temperature=0, logprobs=True, echo=True)
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i][: len(prompt)] == prompt and len(out.tokens[i]) == len(prompt) + 6
        ref = _reference_logprobs(model, prompt, out.tokens[i][len(prompt):])
        torch.testing.assert_close(torch.tensor(out.logprobs[i]), torch.cat([torch.zeros(1), ref]),
                                   atol=1e-5, rtol=1e-5)


def test_prompts_are_prefilled_in_one_pass_and_decoding_takes_one_step_per_new_token():
    model = _model()
    hidden_calls = []
    handle = model.norm.register_forward_pre_hook(lambda module, inputs: hidden_calls.append(inputs[0].shape[1]))
    generate(model, PROMPTS, 10, stop_ids=[], temperature=0)
    handle.remove()
    longest = max(map(len, PROMPTS))
    assert hidden_calls == [longest] + [1] * 9  # one prefill, then 9 single-token steps for 10 new tokens


def test_a_short_prompt_keeps_its_budget_beside_one_that_fills_the_context():
    model = _model(max_seq_len=32)
    long, short = [1] + list(range(3, 31)), [1, 7]  # 29 tokens: room for 3 more in the context
    out = generate(model, [long, short], 12, stop_ids=[], temperature=0)
    assert len(out.tokens[0]) == 3 and len(out.tokens[1]) == 12
    assert out.tokens[1] == generate(model, [short], 12, stop_ids=[], temperature=0).tokens[0]


def test_rows_stop_at_their_own_stop_id_and_the_batch_ends_when_all_have():
    model = _model()
    free = generate(model, PROMPTS, 12, stop_ids=[], temperature=0).tokens
    stop = free[1][3]  # the short prompt's fourth token
    out = generate(model, PROMPTS, 12, stop_ids=[stop], temperature=0).tokens
    for row, full in zip(out, free, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert row == expected


def test_samples_per_prompt_gives_the_rows_of_repeated_prompts_with_one_prefill_per_prompt():
    model = _model()
    repeated = [p for p in PROMPTS for _ in range(3)]
    expected = generate(model, repeated, 10, stop_ids=[], temperature=1.0, logprobs=True,
                        generator=torch.Generator().manual_seed(7))
    prefill_rows = []
    handle = model.norm.register_forward_pre_hook(lambda module, inputs: prefill_rows.append(inputs[0].shape[0]))
    shared = generate(model, PROMPTS, 10, stop_ids=[], temperature=1.0, logprobs=True,
                      generator=torch.Generator().manual_seed(7), samples_per_prompt=3)
    handle.remove()
    assert shared.tokens == expected.tokens
    assert len({tuple(t) for t in shared.tokens[:3]}) > 1  # the copies of a prompt sample apart
    torch.testing.assert_close(torch.tensor(sum(shared.logprobs, [])), torch.tensor(sum(expected.logprobs, [])),
                               atol=1e-5, rtol=1e-5)
    assert prefill_rows[0] == len(PROMPTS) and set(prefill_rows[1:]) == {len(repeated)}


def test_finished_rows_leave_the_batch_without_changing_any_row_s_tokens(monkeypatch):
    import llama2.generation.generator as generator

    model = _model()
    # Rows end at different steps: stop at the tokens the model draws most, with samples of ragged and of
    # equal-length prompts, top-p and logprobs on.
    probe = generate(model, PROMPTS, 24, stop_ids=[], temperature=1.0, generator=torch.Generator().manual_seed(3))
    drawn = sum(probe.tokens, [])
    stops = sorted(set(drawn), key=drawn.count)[-3:]

    def run(prompts: list[list[int]]):
        return generate(model, prompts, 24, stop_ids=stops, temperature=1.0, top_p=0.9, logprobs=True,
                        generator=torch.Generator().manual_seed(11), samples_per_prompt=6)

    for prompts in (PROMPTS, [PROMPTS[0]] * 2):
        fed_rows: list[int] = []
        handle = model.norm.register_forward_pre_hook(lambda module, inputs, rows=fed_rows: rows.append(
            inputs[0].shape[0]))
        dropped = run(prompts)
        handle.remove()
        with monkeypatch.context() as m:
            m.setattr(generator, "_drop_finished_rows", lambda model, held, done, length: held)
            kept = run(prompts)
        assert dropped.tokens == kept.tokens
        torch.testing.assert_close(torch.tensor(sum(dropped.logprobs, [])), torch.tensor(sum(kept.logprobs, [])),
                                   atol=1e-5, rtol=1e-5)
        lengths = [len(t) for t in kept.tokens]
        assert min(lengths) < max(lengths) == 24  # rows really end apart
        assert min(fed_rows[1:]) < len(prompts) * 6  # and the finished ones were no longer fed


class _Chars:
    """A tokenizer stand-in for `generate_texts`: ids printed as letters."""

    eos_id = 95

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + t % 26) for t in ids)


def test_generate_texts_samples_each_prompt_in_batches_of_rows_prompt_major():
    model = _model()
    rows = [p for p in PROMPTS for _ in range(2)]
    expected = generate(model, rows, 8, stop_ids=[_Chars.eos_id], temperature=1.0, top_p=1.0,
                        generator=torch.Generator().manual_seed(3))
    texts = generate_texts(model, _Chars(), PROMPTS, 8, 1.0, 1.0, batch_size=6,
                           generator=torch.Generator().manual_seed(3), samples_per_prompt=2)
    assert texts == [_Chars().decode(t).strip() for t in expected.tokens]
    one_a_batch = generate_texts(model, _Chars(), PROMPTS, 8, 1.0, 1.0, batch_size=2,
                                 generator=torch.Generator().manual_seed(3), samples_per_prompt=2)
    assert len(one_a_batch) == 6
