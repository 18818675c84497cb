import json

import pytest

from benchmarks.gpu_suite import run_suite


@pytest.mark.slow
def test_tiny_suite_writes_json_and_table(tmp_path):
    report = run_suite(tiny=True, out_dir=tmp_path, sections=["bf16", "pretrain", "decode"])
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["shape"]["params"] == report["shape"]["params"] > 0
    assert saved["bf16"]["within_tolerance"] is True
    assert saved["pretrain"][0]["tokens_per_s"] > 0 and saved["pretrain"][0]["compile"] is False
    impls = {(r["batch"], r["impl"]) for r in saved["decode"]}
    assert impls == {(1, "transformers"), (1, "llama2 eager"), (4, "transformers"), (4, "llama2 eager")}
    assert all(r["rows_equal_to_transformers"].split("/")[0] == r["rows_equal_to_transformers"].split("/")[1]
               for r in saved["decode"])  # fp32 greedy on CPU: the same tokens as transformers
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "Greedy decoding" in table and "Pretraining" in table


@pytest.mark.slow
def test_tiny_ppo_section_times_fp32_and_bf16_rollouts(tmp_path):
    report = run_suite(tiny=True, out_dir=tmp_path, sections=["ppo"])
    rows = report["ppo"]["rollouts"]
    assert [r["rollout_dtype"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert 0 < r["generation_seconds"] < r["rollout_seconds"] < r["iteration_seconds"]
    assert rows[0]["generation_logprob_max_diff"] <= 1e-5 < rows[1]["generation_logprob_max_diff"]
    assert "PPO, one iteration" in (tmp_path / "gpu_suite.md").read_text()
