"""Safety-data scaling (SPEC §10.3): the data mixing, and the experiment end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.data.toyworld import ToyWorld
from llama2.model.checkpoint import save_hf
from llama2.stages import safety_scaling as scaling


def _dialogs(tag, n):
    return [[{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}] for i in range(n)]


def test_fractions_give_the_right_counts_with_the_helpfulness_data_fixed():
    helpful, safe = _dialogs("help", 50), _dialogs("safe", 200)
    mixes = [scaling.mix(helpful, safe, f) for f in scaling.FRACTIONS]
    assert [len(m) - 50 for m in mixes] == [0, 2, 20, 50, 100, 200]
    for m in mixes:
        assert m[:50] == helpful  # the helpfulness data never changes
    for smaller, larger in zip(mixes, mixes[1:], strict=False):
        assert larger[: len(smaller)] == smaller  # a larger fraction only adds safety data
    assert scaling.safety_count(0.01, 30) == 1  # a positive fraction takes at least one demonstration
    assert scaling.fraction_name(0.01) == "frac_001" and scaling.fraction_name(1.0) == "frac_100"


def test_toy_world_data_splits_helpfulness_from_safety():
    world = ToyWorld(0)
    helpful, safe = scaling.build_data(scaling.ScalingData(helpful_dialogs=30, safety_dialogs=12), world)
    assert len(helpful) == 30 and len(safe) == 12
    assert not any(world.is_adversarial(d[:-1]) for d in helpful)
    assert all(world.is_adversarial(d[:-1]) for d in safe)


def test_fractions_are_checked():
    with pytest.raises(ValueError, match=r"\[1.5\]"):
        scaling.Config(data=scaling.ScalingData(fractions=[0.0, 1.5]))


@pytest.mark.slow
def test_scaling_experiment_end_to_end(tmp_path, tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=16, max_seq_len=512))
    model.init_weights(seed=0)
    start = save_hf(model, tmp_path / "base", tokenizer_model=tiny_tokenizer_path)
    cfg = load_config(scaling.Config, overrides=[
        f"out_dir={tmp_path / 'scaling'}", f"init_from={start}", "data.helpful_dialogs=6", "data.safety_dialogs=4",
        "data.fractions=[0.0,0.5]", "eval.prompts=2", "eval.max_gen_len=4", "eval.temperature=0.6",
        "eval.samples_per_prompt=2", "epochs=1", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.progress_bar=false", "train.precision=fp32", "train.device=cpu",
        "train.peak_tflops=1",
    ])
    scaling.run(cfg)
    out = tmp_path / "scaling"
    table = json.loads((out / "scaling.json").read_text())
    assert [(r["fraction"], r["safety_dialogs"], r["helpful_dialogs"]) for r in table["rows"]] == [(0.0, 0, 6),
                                                                                                  (0.5, 2, 6)]
    for r in table["rows"]:
        assert 0.0 <= r["violation_rate"] <= 1.0 and r["safety_rm"] is None
        assert r["prompts"] == {"helpful": 2, "adversarial": 2, "borderline": 1}
        assert r["decoding"]["temperature"] == 0.6 and r["decoding"]["samples_per_prompt"] == 2
    assert any("RM columns skipped" in n for n in table["notes"])
    assert "| 50% | 2 |" in (out / "scaling.md").read_text()
    assert (out / "scaling_scores.png").is_file() and (out / "false_refusal.png").is_file()
