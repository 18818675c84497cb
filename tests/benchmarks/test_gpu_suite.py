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
