"""Pairs of a model's own samples: two distinct samples per held-out prompt, ranked by the annotator."""

from __future__ import annotations

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.data.toyworld import ToyWorld
from llama2.evaluation.policy_pairs import sample_pairs


def test_pairs_of_a_models_samples_are_distinct_labelled_and_reproducible(tiny_tokenizer_path):
    tokenizer = Tokenizer(tiny_tokenizer_path)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  multiple_of=16, max_seq_len=1024))
    model.init_weights(seed=0)
    model.eval()
    world = ToyWorld(0)
    pairs = sample_pairs(model, tokenizer, world, prompts=6, max_gen_len=8, seed=3)
    assert 0 < len(pairs) <= 6
    for p in pairs:
        assert p.prompt[-1]["role"] == "user" and p.chosen != p.rejected and p.chosen and p.rejected
        assert p.rating in ("significantly_better", "better", "slightly_better", "negligibly_better")
        assert world.judges.analyze(p.prompt).task is not None  # a helpful (or borderline) task
    again = sample_pairs(model, tokenizer, world, prompts=6, max_gen_len=8, seed=3)
    assert [p.to_dict() for p in again] == [p.to_dict() for p in pairs]
    other = sample_pairs(model, tokenizer, world, prompts=6, max_gen_len=8, seed=4)
    assert [p.to_dict() for p in other] != [p.to_dict() for p in pairs]
