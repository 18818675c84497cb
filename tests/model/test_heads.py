"""The scalar-head model: last-real-token scoring, the likelihood gate, and the HF LlamaForSequenceClassification
round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.model.heads import GATE_SCALE, GATE_START, ScalarHeadModel, load_scalar_head, save_scalar_head_hf

PAD = 0


def tiny_lm(vocab_size: int = 320, seed: int = 0, max_seq_len: int = 256) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=max_seq_len)
    lm = Transformer(args)
    lm.init_weights(seed)
    return lm


def tiny_rm(vocab_size: int = 320, seed: int = 0) -> ScalarHeadModel:
    rm = ScalarHeadModel.from_language_model(tiny_lm(vocab_size, seed))
    torch.nn.init.normal_(rm.score.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return rm


def test_from_language_model_drops_the_lm_head_and_zero_initialises_the_score():
    lm = tiny_lm(max_seq_len=64)
    tokens = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    expected_hidden = lm.hidden_states(tokens)
    rm = ScalarHeadModel.from_language_model(lm)
    assert not any("output" in k for k in rm.state_dict())
    assert rm.score.weight.shape == (1, 64) and not rm.score.weight.any()
    assert torch.equal(rm(tokens, torch.tensor([9, 4])), torch.zeros(2))
    assert torch.equal(rm.trunk.hidden_states(tokens), expected_hidden)


def test_reward_reads_the_last_real_token_whatever_the_padding():
    rm = tiny_rm()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 320, (7,), generator=gen), torch.randint(3, 320, (4,), generator=gen)
    alone = torch.stack([rm(a[None], torch.tensor([7]))[0], rm(b[None], torch.tensor([4]))[0]])
    padded = torch.full((2, 12), PAD)
    padded[0, :7], padded[1, :4] = a, b
    together = rm(padded, torch.tensor([7, 4]))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert alone[0] != alone[1]


@pytest.mark.slow  # importing transformers takes seconds
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_sequence_classifier_gives_the_same_scores(tmp_path, tiny_tokenizer_path, monkeypatch, sharded):
    transformers = pytest.importorskip("transformers")
    if sharded:  # the trunk in several shards: the head gets its own file in the index
        monkeypatch.setattr("llama2.model.checkpoint.MAX_SHARD_BYTES", 200_000)
    rm = tiny_rm(Tokenizer(tiny_tokenizer_path).n_words)
    out = save_scalar_head_hf(rm, tmp_path / "rm", pad_token_id=PAD, tokenizer_model=tiny_tokenizer_path)
    assert (out / "model.safetensors.index.json").is_file() == sharded
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == PAD
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 300, (n,), generator=gen) for n in (11, 5, 8)]
    tokens = torch.full((3, 11), PAD)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = torch.tensor([11, 5, 8])
    ours = rm(tokens, lengths)
    with torch.no_grad():
        batched = hf(tokens).logits[:, 0]  # right-padded: HF's rightmost non-pad token = lengths - 1
        single = torch.stack([hf(r[None]).logits[0, 0] for r in rows])  # unpadded, one at a time
    torch.testing.assert_close(batched, ours.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, ours.detach(), rtol=1e-4, atol=1e-4)
    loaded, pad = load_scalar_head(out)
    assert pad == PAD
    torch.testing.assert_close(loaded(tokens, lengths), ours.detach(), rtol=1e-6, atol=1e-6)


def gated_rm(vocab_size: int = 320, seed: int = 0) -> tuple[ScalarHeadModel, Transformer]:
    """A likelihood-gated RM with random score and gate weights, and an untouched copy of its chat model."""
    lm = tiny_lm(vocab_size, seed)
    chat = copy.deepcopy(lm)
    rm = ScalarHeadModel.from_language_model(lm, likelihood_gate=True)
    gen = torch.Generator().manual_seed(seed)
    for p in (rm.score.weight, rm.likelihood_gate.weight):
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    return rm, chat


def test_likelihood_gate_starts_small_and_keeps_the_chat_models_lm_head_frozen():
    lm = tiny_lm(max_seq_len=64)
    chat = copy.deepcopy(lm)
    rm = ScalarHeadModel.from_language_model(lm, likelihood_gate=True)
    assert not rm.trunk.output.weight.requires_grad and torch.equal(rm.trunk.output.weight, chat.output.weight)
    assert not rm.score.weight.any() and not rm.likelihood_gate.weight.any()
    tokens = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(chat(tokens)[0], dim=-1)
    surprise = sum(logp[t - 1, tokens[0, t]] - logp[t - 1].max() for t in range(4, 9))
    torch.testing.assert_close(rm(tokens, torch.tensor([9]), torch.tensor([4]))[0], GATE_START * surprise,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="response start"):
        rm(tokens, torch.tensor([9]))


def test_likelihood_term_is_a_gated_sum_over_response_tokens_only():
    rm, chat = gated_rm()
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 320, (n,), generator=gen) for n in (10, 6)]
    starts, lengths = torch.tensor([7, 2]), torch.tensor([10, 6])
    tokens = torch.full((2, 10), PAD)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    got = rm(tokens, lengths, starts)
    for i, r in enumerate(rows):  # each row alone, term by term, from the untouched chat model
        h = chat.hidden_states(r[None])[0]
        logp = torch.log_softmax(chat.output(h).float(), dim=-1)
        term = sum(torch.nn.functional.softplus(GATE_SCALE * rm.likelihood_gate(h[t - 1]))[0]
                   * (logp[t - 1, r[t]] - logp[t - 1].max()) for t in range(int(starts[i]), len(r)))
        torch.testing.assert_close(got[i], rm.score(h[-1])[0] + term, rtol=1e-4, atol=1e-5)
    # the prompt does not count: changing a prompt token's surprise moves only the hidden states after it
    assert rm(tokens[:1], lengths[:1], torch.tensor([7])) != rm(tokens[:1], lengths[:1], torch.tensor([3]))


@pytest.mark.slow  # importing transformers takes seconds
def test_gated_rm_round_trips_and_transformers_reads_its_scalar_part(tmp_path, tiny_tokenizer_path):
    transformers = pytest.importorskip("transformers")
    rm, _ = gated_rm(Tokenizer(tiny_tokenizer_path).n_words)
    out = save_scalar_head_hf(rm, tmp_path / "rm", pad_token_id=PAD, tokenizer_model=tiny_tokenizer_path)
    tokens = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    lengths, starts = torch.tensor([9, 9]), torch.tensor([5, 3])
    loaded, _ = load_scalar_head(out)
    assert loaded.likelihood_gate is not None and not loaded.trunk.output.weight.requires_grad
    torch.testing.assert_close(loaded(tokens, lengths, starts), rm(tokens, lengths, starts), rtol=1e-6, atol=1e-6)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        scalar_part = rm.score(rm.trunk.hidden_states(tokens)[:, -1])[:, 0]
        torch.testing.assert_close(hf(tokens).logits[:, 0], scalar_part, rtol=1e-4, atol=1e-4)
