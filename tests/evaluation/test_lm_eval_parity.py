"""lm-eval parity: its `piqa` task on our checkpoint directory gives our piqa numbers.

lm-eval is not a project dependency; this test skips without it. It runs offline: the task file below reads the
PIQA records from a local jsonl through the `datasets` json builder, nothing is downloaded. To run it, install
`lm-eval==0.4.13` and `accelerate` into an environment that also sees this project, e.g.
`PYTHONPATH=src python -m pytest tests/evaluation/test_lm_eval_parity.py`.
"""

import json

import pytest

from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.cli import main
from llama2.evaluation.benchmark_data import read_piqa
from llama2.evaluation.loglikelihood import loglikelihoods
from llama2.model.checkpoint import save_hf

lm_eval = pytest.importorskip("lm_eval")

N_RECORDS = 24

TASK_YAML = """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
"""lm-eval 0.4.13's tasks/piqa/piqa.yaml with the dataset swapped for a local file (prompt fields unchanged)."""


@pytest.mark.slow
def test_piqa_matches_lm_eval(shared_data, llama2_tokenizer_path, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    model_dir = tmp_path / "model"
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                                  max_seq_len=512))
    model.init_weights(3)
    save_hf(model, model_dir, tokenizer_model=llama2_tokenizer_path)

    source = shared_data / "piqa"
    records = (source / "valid.jsonl").read_text().splitlines()[:N_RECORDS]
    labels = (source / "valid-labels.lst").read_text().split()[:N_RECORDS]
    ours_dir = tmp_path / "piqa"
    ours_dir.mkdir()
    (ours_dir / "valid.jsonl").write_text("\n".join(records) + "\n")
    (ours_dir / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    hf_data = tmp_path / "piqa_hf.jsonl"
    hf_data.write_text("".join(json.dumps({**json.loads(r), "label": int(x)}) + "\n"
                               for r, x in zip(records, labels, strict=True)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa_local.yaml").write_text(TASK_YAML.format(data=hf_data))

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["piqa_local"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  batch_size=8, device="cpu", log_samples=True)
    theirs = out["results"]["piqa_local"]
    ours_json = tmp_path / "ours.json"
    assert main(["eval", "--model", str(model_dir), "--task", "piqa", "--data", str(ours_dir),
                 "--json", str(ours_json)]) == 0
    ours = json.loads(ours_json.read_text())["piqa"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"])

    # Request by request: equal wherever both tokenizers produce the same ids. transformers 5's LlamaTokenizer
    # merges two spaces into the piece '▁▁' where Meta's SentencePiece model (ours) gives '▁', '▁x'.
    from llama2 import Llama

    llm = Llama.load(model_dir)
    hf_tok, sp_tok = AutoTokenizer.from_pretrained(model_dir), Tokenizer(llama2_tokenizer_path)
    items = read_piqa(ours_dir)
    compared = 0
    for sample in out["samples"]["piqa_local"]:
        item = items[sample["doc_id"]]
        pairs = [(item.context, " " + c) for c in item.choices]
        assert [tuple(a) for a in sample["arguments"]] == pairs  # the same prompts
        scored = zip(pairs, sample["resps"], loglikelihoods(llm, pairs), strict=True)
        for (context, continuation), resp, (ll, greedy) in scored:
            if hf_tok.encode(context + continuation) != sp_tok.encode(context + continuation, bos=True, eos=False):
                continue
            assert ll == pytest.approx(float(resp[0][0]), abs=1e-3)
            assert greedy == bool(resp[0][1])
            compared += 1
    assert compared >= 2 * N_RECORDS - 4
