"""`llama2 sft` end to end on CPU: a tiny model overfits a handful of dialogs and then answers them."""

from __future__ import annotations

import json

import pytest

from llama2 import Llama, ModelArgs, Tokenizer, Transformer
from llama2.config import load_config
from llama2.model.checkpoint import save_hf
from llama2.stages import sft
from llama2.stages.artifacts import model_dir

DIALOGS = [
    [{"role": "user", "content": "What is the capital of Varnland?"},
     {"role": "assistant", "content": "The capital of Varnland is Olmhaven."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count to 3"},
     {"role": "assistant", "content": "1, 2, 3"}, {"role": "user", "content": "and back?"},
     {"role": "assistant", "content": "3, 2, 1"}],
    [{"role": "user", "content": "a story about owls"},
     {"role": "assistant", "content": "The owls sang a song by the river."}],
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
]


@pytest.fixture
def start_model(tmp_path, tiny_tokenizer_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(tiny_tokenizer_path).n_words,
                     multiple_of=16, max_seq_len=128)
    model = Transformer(args)
    model.init_weights(seed=0)
    return save_hf(model, tmp_path / "start", tokenizer_model=tiny_tokenizer_path)


@pytest.mark.slow
def test_sft_overfits_and_chat_completion_reproduces_the_answers(tmp_path, start_model):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS))
    cfg = load_config(sft.Config, overrides=[
        f"out_dir={tmp_path / 'run'}", f"init_from={start_model}", f"data.train_files=[{data}]", "epochs=100",
        "train.micro_batch_size=1", "train.global_batch_size=1", "train.lr=3e-3", "train.warmup_steps=5",
        "train.precision=fp32", "train.progress_bar=false", "train.peak_tflops=1", "train.device=cpu",
    ])
    result = sft.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.05 < losses[0]
    llm = Llama.load(model_dir(tmp_path / "run"))
    assert model_dir(tmp_path / "run") == result.checkpoint / "model"
    prompts = [d[:-1] for d in DIALOGS]
    replies = [r["generation"]["content"] for r in llm.chat_completion(prompts, temperature=0, max_gen_len=64)]
    # The chat format trains "answer </s>" with a space before EOS (SPEC §4), so replies end with that space.
    assert [r.strip() for r in replies] == [d[-1]["content"] for d in DIALOGS]


def test_sft_reports_bad_data_clearly(tmp_path, start_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = load_config(sft.Config, overrides=[f"out_dir={tmp_path / 'run'}", f"init_from={start_model}",
                                            f"data.train_files=[{data}]", "train.device=cpu"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*assistant"):
        sft.run(cfg)
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        sft.run(load_config(sft.Config, overrides=[f"init_from={tmp_path}", f"data.train_files=[{data}]"]))
