"""The scalar-head model: last-real-token scoring, and the HF LlamaForSequenceClassification round trip."""

from __future__ import annotations

import pytest
import torch

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.model.heads import ScalarHeadModel, load_scalar_head, save_scalar_head_hf

PAD = 0


def tiny_rm(vocab_size: int = 320, seed: int = 0) -> ScalarHeadModel:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=256)
    lm = Transformer(args)
    lm.init_weights(seed)
    rm = ScalarHeadModel.from_language_model(lm)
    torch.nn.init.normal_(rm.score.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return rm


def test_from_language_model_drops_the_lm_head_and_zero_initialises_the_score():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=64)
    lm = Transformer(args)
    lm.init_weights(0)
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
