"""The smoke pipeline end to end, interrupted between stages and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest

from llama2 import pipeline
from llama2.training.loop import TrainResult

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "smoke.yaml"


@pytest.mark.slow
def test_smoke_pipeline_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch, capsys):
    cfg = pipeline.load_pipeline_config(str(SMOKE), str(tmp_path / "run"), [])

    def interrupted(cfg, out):
        raise KeyboardInterrupt

    stages = list(pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", [s if s.name != "gatt" else pipeline.Stage("gatt", interrupted)
                                             for s in stages])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg)
    names = [s.name for s in stages]
    before = names[: names.index("gatt")]
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/stage.json")}
    assert set(finished) == set(before)

    ran = []
    monkeypatch.setattr(pipeline, "STAGES", [pipeline.Stage(s.name, _recording(s, ran)) for s in stages])
    capsys.readouterr()
    report = pipeline.run_pipeline(cfg)
    assert ran == names[len(before) :]  # finished stages were skipped
    log = capsys.readouterr().err  # each stage numbered, skipped or timed
    assert f"pipeline: [1/{len(names)}] data already done" in log
    assert f"pipeline: [{len(names)}/{len(names)}] evaluation done in " in log
    assert {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/stage.json")
            if p.parent.name in finished} == finished

    # Every report.json key of DESIGN §4, with numbers.
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    for kind in ("helpfulness", "safety"):
        rm = saved["reward_models"][kind]
        for rating in ("significantly_better", "better", "slightly_better", "negligibly_better", "overall"):
            assert rating in rm["accuracy_by_rating"]
        assert 0.0 <= rm["accuracy_by_rating"]["overall"] <= 1.0 and 0.0 <= rm["label_ceiling"] <= 1.0
    on_policy = saved["reward_models"]["helpfulness"]["on_policy_samples"]  # pairs of the SFT model's samples
    assert 0 < on_policy["pairs"] <= cfg.rm_policy_pairs and 0.0 <= on_policy["label_ceiling"] <= 1.0
    pairs = (tmp_path / "run" / "reward_helpfulness" / "sft_sample_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == on_policy["pairs"] and all(p["chosen"] != p["rejected"] for p in map(json.loads, pairs))
    assert all(isinstance(v, float) for v in saved["rejection_sampling"]["reward_by_n"].values())
    assert set(saved["margin_ablation"]) == {"none", "small", "large"}
    assert all(0.0 <= by["overall"] <= 1.0 for by in saved["margin_ablation"].values())
    assert {"base", "sft", "rlhf", "safety"} <= saved["models"].keys()
    # SFT's second phase (instruction dialogs) ran after the demonstrations, and the later stages start from it
    sft_result = saved["stages"]["sft"]
    assert Path(sft_result["model"]).is_relative_to(tmp_path / "run" / "sft" / "instructions")
    assert Path(sft_result["demonstrations"]["model"]).is_relative_to(tmp_path / "run" / "sft" / "checkpoints")
    rm_config = next((tmp_path / "run" / "reward_helpfulness" / "checkpoints").glob("*/config.yaml")).read_text()
    assert f"init_from: {sft_result['model']}" in rm_config
    for model in saved["models"].values():
        for key in ("helpfulness", "violation_rate", "false_refusal_rate"):
            assert 0.0 <= model[key] <= 1.0
        assert model["prompts"]["helpful"] == cfg.evaluation.helpful_prompts != model["prompts"]["adversarial"]
        assert "helpfulness_scores" not in model  # per-prompt scores stay in the evaluation stage's results
        assert model["decoding"] == {"temperature": 0.6, "top_p": 0.9, "samples_per_prompt": 2}  # the preset's
    changes = saved["helpfulness_changes"]  # each stage against the model it started from, paired per prompt
    assert [(c["from"], c["to"]) for c in changes] == [*pairwise(saved["models"]), ("sft", "rlhf")]  # RLHF as a whole
    assert all(c["prompts"] == cfg.evaluation.helpful_prompts and c["standard_error"] >= 0 for c in changes)
    assert all(isinstance(saved["ppo"][k], float) for k in ("mean_kl", "reward_start", "reward_end"))
    stopping = saved["ppo"]["early_stopping"]  # scored on the held-out RL prompts before and after each iteration
    assert stopping["evaluations"] == cfg.ppo.ppo.iterations + 1 and not stopping["stopped_early"]
    assert len((tmp_path / "run" / "data" / pipeline.RL_HELDOUT).read_text().splitlines()) == 8
    curves = saved["gatt"]["adherence_by_turn"]
    assert len(curves["with_gatt"]) == len(curves["without_gatt"]) == cfg.evaluation.gatt_turns
    assert set(saved["gatt"]["by_kind"]) == {"with_gatt", "without_gatt"} and saved["gatt"]["by_kind"]["with_gatt"]
    assert all(1 <= f["first_turn"] <= f["turns_failed"] + f["first_turn"] - 1 <= cfg.evaluation.gatt_turns
               for f in saved["gatt"]["failures_with_gatt"])
    assert set(saved["timings"]) == set(names)
    assert [m["stages"] for m in saved["machines"]] == [list(saved["timings"])]  # every stage, on this machine
    assert all(t["seconds"] > 0 for t in saved["timings"].values())
    text = (tmp_path / "run" / "report.md").read_text()
    assert "paired over the same prompts" in text
    assert "What each stage did" in text and "gatt_adherence.png" in text and "Table 28 analogue" in text
    assert "pairs of the SFT model's own samples" in text
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    assert report["checks"]
    # the safety stage fine-tuned on safety demonstrations and helpful replay beside the distilled answers
    mixed = (tmp_path / "run" / "safety" / "safety_sft.jsonl").read_text().splitlines()
    refusals = [json.loads(line)["messages"][-1]["content"] for line in mixed]
    assert len(mixed) == 20 and sum(r.startswith("I can't help you") for r in refusals) == 8
    # GAtt fine-tuned on one-turn instruction dialogs beside its own synthetic ones
    replay = [json.loads(line)["messages"] for line in
              (tmp_path / "run" / "gatt" / "gatt_replay.jsonl").read_text().splitlines()]
    assert len(replay) == cfg.gatt_replay and all([m["role"] for m in d] == ["system", "user", "assistant"]
                                                   for d in replay)
    gatt_config = next((tmp_path / "run" / "gatt" / "checkpoints").glob("*/config.yaml")).read_text()
    assert "gatt_replay.jsonl" in gatt_config and "gatt_train.jsonl" in gatt_config


def test_a_stage_whose_training_was_interrupted_is_not_marked_done(tmp_path, monkeypatch):
    cfg = pipeline.load_pipeline_config(str(SMOKE), str(tmp_path / "run"), [])
    stopped = TrainResult(step=3, checkpoint=None, final_loss=1.0, val_loss=None, interrupted=True)
    monkeypatch.setattr(pipeline, "STAGES", [pipeline.Stage("sft", lambda cfg, out: pipeline._train_summary(stopped,
                                                                                                          out))])
    with pytest.raises(KeyboardInterrupt, match="rerun the same pipeline command"):
        pipeline.run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft" / "stage.json").exists()


def test_an_optional_stage_recorded_while_off_runs_once_turned_on(tmp_path, monkeypatch):
    ran = []

    def ablation(cfg, out):
        ran.append(cfg.margin_ablation)
        return {}

    monkeypatch.setattr(pipeline, "STAGES", [pipeline.Stage("reward_margins", ablation, lambda c: c.margin_ablation)])
    monkeypatch.setattr("llama2.evaluation.report.write_report", lambda out, results: {"results": results})
    off, on = ["margin_ablation=false"], ["margin_ablation=true"]
    recorded = []
    for sets in (off, on, on, off):
        pipeline.run_pipeline(pipeline.load_pipeline_config(str(SMOKE), str(tmp_path / "run"), sets))
        recorded.append(json.loads((tmp_path / "run" / "reward_margins" / "stage.json").read_text())["enabled"])
    assert recorded == [False, True, True, True]  # off, then turned on; done (and on) after that
    assert ran == [True]  # an off stage is not called; once done while on, it never runs again


def _recording(stage, ran):
    def run(cfg, out):
        ran.append(stage.name)
        return stage.run(cfg, out)

    return run


def test_the_reward_models_are_judged_by_the_oracle_of_the_runs_own_world(tmp_path, monkeypatch):
    # the label ceiling of a seed-1 run was once computed with world 0's oracle, which knows other facts
    root = tmp_path / "run"
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "config.json").write_text("{}")
    cfg = pipeline.load_pipeline_config("smoke", str(root), ["data.seed=3"])
    seen = []

    class Trained(Exception):
        pass

    def train(stage):
        seen.append((stage.kind, stage.eval.oracle, stage.eval.world_seed))
        raise Trained

    monkeypatch.setattr(pipeline.reward, "run", train)
    for run in (pipeline.run_reward_helpfulness, pipeline.run_reward_safety):
        with pytest.raises(Trained):
            run(cfg, root / "rm")
    assert seen == [("helpfulness", "toyworld", 3), ("safety", "toyworld", 3)]


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_the_presets_safety_rm_is_trained_with_the_auxiliary_loss(preset):
    # without it the safety RM's level is free, and PPO's 0.15 gate fired on 15% of the demo's replies to
    # helpful prompts (the presets' `reward_safety:` sections once replaced the field's default entirely)
    cfg = pipeline.load_pipeline_config(preset, None, [])
    assert cfg.reward_safety.safety_loss_weight > 0
    assert pipeline.PipelineConfig().reward_safety.safety_loss_weight > 0


def test_safety_tunings_helpful_replay_has_the_configured_share_of_careless_answers():
    from llama2.data.toyworld import ToyWorld

    cfg = pipeline.load_pipeline_config("demo", None, [])
    assert cfg.safety.replay_careless_rate == 0.0 and cfg.data.sft_careless_rate > 0
    world = ToyWorld(0)

    def helpfulness(dialogs):  # the oracle's mean score of every answer in its context
        scores = [world.helpfulness(d[:i], m["content"]) for d in dialogs for i, m in enumerate(d)
                  if m["role"] == "assistant"]
        return sum(scores) / len(scores)

    careful = pipeline._helpful_dialogs(cfg, world, 60, seed=22, careless_rate=0.0)
    careless = pipeline._helpful_dialogs(cfg, world, 60, seed=22, careless_rate=1.0)
    sft_mix = pipeline._helpful_dialogs(cfg, world, 60, seed=22)  # the SFT set's own share
    assert helpfulness(careful) > helpfulness(sft_mix) > helpfulness(careless)


def test_a_stage_runs_in_a_process_of_its_own_and_a_failure_names_it(tmp_path):
    cfg = pipeline.load_pipeline_config(str(SMOKE), str(tmp_path), ["stage_processes=true"])
    stages = {s.name: s for s in pipeline.STAGES}
    (tmp_path / "data").mkdir()
    result = pipeline.run_stage_in_process(stages["data"], cfg, tmp_path / "data")
    assert result["tokenizer"] and (tmp_path / "data" / "sft_helpful.jsonl").is_file()
    assert not (tmp_path / "data" / "result.tmp.json").exists()
    (tmp_path / "ppo").mkdir()  # no rejection-sampling model to start from
    with pytest.raises(RuntimeError, match="stage ppo failed in its process"):
        pipeline.run_stage_in_process(stages["ppo"], cfg, tmp_path / "ppo")


def _stage_processes(pid: int) -> list[int]:
    """The spawned children of `pid` (multiprocessing's resource tracker, also a child, is left out)."""
    tasks = Path(f"/proc/{pid}/task")
    children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []
    return [c for c in children if "spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:  # it has just exited
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not any(Path("/proc/self/task").glob("*/children")),
                    reason="reads child processes from Linux's /proc/PID/task/TID/children")
def test_sigterm_to_the_driver_stops_the_stage_process_too(tmp_path):
    """`kill <driver>` must not leave the stage's process running on in the run folder."""
    out = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "llama2.cli", "pipeline", "--preset", str(SMOKE), "--out",
                               str(out), "--set", "stage_processes=true"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "data" / "stage.json").is_file() and _stage_processes(driver.pid)):  # pretraining's
            assert driver.poll() is None and time.monotonic() < deadline, "the pretraining stage never started"
            time.sleep(0.2)
        stage = _stage_processes(driver.pid)
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr
    assert all(not Path(f"/proc/{pid}").exists() for pid in stage)
    assert not (out / "pretrain" / "stage.json").exists()
