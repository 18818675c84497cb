"""Early stopping's bookkeeping: which evaluation is best, when to stop, and what survives a resume."""

from __future__ import annotations

import pytest
import torch

from llama2.training.early_stopping import EarlyStopper, EarlyStopping, best_of, should_stop


def evals(*rewards: float, every: int = 10) -> list[dict]:
    return [{"iteration": i * every, "reward": r} for i, r in enumerate(rewards)]


def test_the_best_is_the_first_evaluation_beaten_by_more_than_min_delta():
    assert best_of(evals(0.5, 0.6, 0.55), 0.0)["iteration"] == 10
    assert best_of(evals(0.5, 0.5, 0.5), 0.0)["iteration"] == 0  # a tie is not an improvement
    assert best_of(evals(0.5, 0.52, 0.56), 0.03)["iteration"] == 20  # 0.52 is within the delta of 0.5


def test_stops_after_patience_evaluations_without_a_new_best():
    assert not should_stop([], 2, 0.0)
    assert not should_stop(evals(0.5, 0.4), 2, 0.0)
    assert should_stop(evals(0.5, 0.4, 0.45), 2, 0.0)
    assert not should_stop(evals(0.5, 0.4, 0.45, 0.6), 2, 0.0)  # a new best resets the count


def test_rejects_settings_that_never_evaluate():
    with pytest.raises(ValueError, match="every"):
        EarlyStopping(prompts=["p.jsonl"], every=0)


def test_keeps_the_best_weights_and_resumes_from_the_evaluations_up_to_the_checkpoint(tmp_path):
    cfg = EarlyStopping(prompts=["p.jsonl"], every=2, patience=2)
    stopper = EarlyStopper(cfg, tmp_path, resumed_at=0)
    assert stopper.due(0) and not stopper.due(1)
    for iteration, reward in ((0, 0.5), (2, 0.7), (4, 0.6)):
        entry = stopper.record(iteration, reward, {"w": torch.full((2,), float(iteration))})
        assert entry["best"] == (iteration != 4)  # the best so far, when logged
    assert not stopper.due(4)
    assert torch.equal(stopper.best_state()["w"], torch.full((2,), 2.0))
    stopper.prune()  # after a checkpoint: only the best's weights stay
    assert [f.name for f in (tmp_path / "early_stopping").iterdir()] == ["policy_00000002.safetensors"]
    stopper.record(6, 0.65, {"w": torch.zeros(2)})
    assert stopper.stop()
    resumed = EarlyStopper(cfg, tmp_path, resumed_at=4)  # the checkpoint at 4: the evaluation at 6 is redone
    assert [e["iteration"] for e in resumed.evaluations] == [0, 2, 4]
    assert resumed.due(6) and not resumed.stop() and resumed.best()["iteration"] == 2
