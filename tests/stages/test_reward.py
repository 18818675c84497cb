"""`llama2 reward` on CPU: Anthropic HH pairs feed the trainer and the loss falls; toy-world pairs with the
safety mix and auxiliary loss produce a recorded evaluation with the oracle's label ceiling."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.data.formats import dumps
from llama2.model.checkpoint import load_checkpoint, save_hf
from llama2.stages import reward
from llama2.stages.reward_models import RM_EVAL_FILE, check_rm_gate, load_reward_model


def save_start_model(path, tokenizer_path, max_seq_len=128):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(tokenizer_path).n_words,
                     multiple_of=16, max_seq_len=max_seq_len)
    model = Transformer(args)
    model.init_weights(seed=0)
    return save_hf(model, path, tokenizer_model=tokenizer_path)


def quiet(tmp_path, *extra):
    return [f"out_dir={tmp_path / 'run'}", "train.precision=fp32", "train.progress_bar=false",
            "train.peak_tflops=1", "train.device=cpu", *extra]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("likelihood_gate", [False, True])
def test_hh_pairs_train_the_reward_model_and_lower_the_loss(tmp_path, shared_data, llama2_tokenizer_path,
                                                            likelihood_gate):
    source = shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(8)]
    subset = tmp_path / "hh8.jsonl.gz"
    with gzip.open(subset, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    start = save_start_model(tmp_path / "start", llama2_tokenizer_path)
    cfg = load_config(reward.Config, overrides=quiet(
        tmp_path, f"init_from={start}", f"data.train_files=[{subset}]", f"data.test_files=[{subset}]",
        "max_seq_len=64", "epochs=8", "train.global_batch_size=8", "train.micro_batch_size=8", "train.lr=2e-3",
        f"likelihood_gate={str(likelihood_gate).lower()}",
    ))
    result = reward.run(cfg)
    rows = metrics(tmp_path / "run")
    assert result.step == 8
    if not likelihood_gate:  # zero head: log 2 (the gate starts at the chat model's own preference)
        assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    recorded = json.loads((tmp_path / "run" / RM_EVAL_FILE).read_text())
    assert recorded["test_sets"]["hh8.jsonl.gz"]["accuracy_by_rating"]["unrated"] > 0.8
    assert check_rm_gate(tmp_path / "run", 0.8, allow_weak=False) == recorded["accuracy"]
    config = json.loads((result.checkpoint / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    rm = load_reward_model(result.checkpoint / "model", device="cpu").model
    assert (rm.likelihood_gate is not None) == likelihood_gate
    if likelihood_gate:  # trained around the chat model's predictions, never into them
        start_head = load_checkpoint(start, Tokenizer(llama2_tokenizer_path).n_words).output.weight
        assert torch.equal(rm.trunk.output.weight, start_head)
        assert rm.likelihood_gate.weight.any()


@pytest.mark.slow
def test_toy_safety_rm_mixes_helpfulness_and_records_oracle_metrics(tmp_path, tiny_tokenizer_path):
    from llama2.data.toyworld import ToyWorld

    world = ToyWorld(0)
    files = {}
    for kind, split, n in (("safety", "train", 36), ("helpfulness", "train", 40), ("safety", "test", 24)):
        files[kind, split] = tmp_path / f"pref_{kind}_{split}.jsonl"
        pairs = world.preference_pairs(kind, n, split)
        files[kind, split].write_text("".join(dumps(p.to_dict()) + "\n" for p in pairs))
    start = save_start_model(tmp_path / "start", tiny_tokenizer_path, max_seq_len=256)
    cfg = load_config(reward.Config, overrides=quiet(
        tmp_path, f"init_from={start}", "kind=safety", "margin=large", "safety_loss_weight=1.0",
        f"data.train_files=[{files['safety', 'train']}]", f"data.mix_files=[{files['helpfulness', 'train']}]",
        f"data.test_files=[{files['safety', 'test']}]", "eval.oracle=toyworld", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.lr=1e-3",
    ))
    result = reward.run(cfg)
    assert result.step == 5  # (36 safety + 4 helpfulness = 10%) pairs / 8 a batch, one epoch
    assert "safety_loss" in metrics(tmp_path / "run")[0]
    report = json.loads((tmp_path / "run" / RM_EVAL_FILE).read_text())
    test = report["test_sets"]["pref_safety_test.jsonl"]
    assert report["kind"] == "safety" and report["margin"] == "large"
    assert 0.0 <= test["unsafe_recall"]["recall"] <= 1.0 and test["unsafe_recall"]["unsafe_responses"] > 0
    assert 0.5 < report["label_ceiling"] <= 1.0 and test["oracle_correlation"] is not None
    assert (tmp_path / "run" / "rm_scores_pref_safety_test.png").stat().st_size > 1000
    rm = load_reward_model(tmp_path / "run", device="cpu")
    scores = rm.score([[{"role": "user", "content": "hi"}]] * 2, ["Hello there.", "Go away."])
    assert all(0.0 < s < 1.0 for s in scores) and scores[0] != scores[1]


def test_reward_refuses_empty_data(tmp_path, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="train_files is empty"):
        reward.run(load_config(reward.Config, overrides=quiet(tmp_path)))
    with pytest.raises(ValueError, match="mix_fraction"):
        load_config(reward.Config, overrides=["data.mix_fraction=1.0"])
