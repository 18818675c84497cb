"""`llama2 pretrain` end to end on CPU: a small run, its checkpoint, and exact resume after SIGKILLs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llama2.config import load_config
from llama2.data.packing import collate_windows
from llama2.model.checkpoint import load_checkpoint
from llama2.model.transformer import Transformer
from llama2.stages import pretrain
from llama2.training.checkpointing import list_checkpoints
from llama2.training.faults import ENV_VAR

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "smoke.yaml"


def overrides(pretrain_data, out: Path, **train) -> list[str]:
    corpus, tok = pretrain_data
    sets = [f"out_dir={out}", f"data.train_files=[{corpus}]", f"data.tokenizer={tok}", "model.max_seq_len=64",
            "train.progress_bar=false", "train.precision=fp32", "train.peak_tflops=1"]
    return sets + [f"train.{k}={v}" for k, v in train.items()]


def test_pretrain_smoke_run_and_checkpoint(tmp_path, pretrain_data):
    out = tmp_path / "run"
    cfg = load_config(pretrain.Config, SMOKE, overrides(pretrain_data, out, steps=12, checkpoint_every=6))
    result = pretrain.run(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 12]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])

    ckpt = result.checkpoint
    assert ckpt.name == "step_00000012" and (ckpt / "model" / "tokenizer.model").is_file()
    # The HF directory loads as a model, and the saved config rebuilds the same shape.
    model = load_checkpoint(ckpt / "model")
    saved = load_config(pretrain.Config, ckpt / "config.yaml")
    assert saved.train == cfg.train and saved.model.max_seq_len == 64
    rebuilt = Transformer(saved.model.build_args(model.args.vocab_size))
    rebuilt.load_state_dict(model.state_dict())  # strict: the same shapes
    tokens = torch.tensor([[1, 5, 9, 30]])
    assert torch.equal(rebuilt(tokens), model(tokens)) and torch.isfinite(model(tokens)).all()


def _run_subprocess(pretrain_data, out: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    if fault:
        env[ENV_VAR] = fault
    sets = overrides(pretrain_data, out, steps=8, checkpoint_every=2, keep_checkpoints=2, val_every=4)
    cmd = [sys.executable, "-m", "llama2.cli", "pretrain", "--config", str(SMOKE)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _timing_free(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")} for r in rows]


@pytest.mark.slow
def test_resume_after_sigkill_at_three_points_is_bit_exact(tmp_path, pretrain_data):
    reference = tmp_path / "reference"
    assert _run_subprocess(pretrain_data, reference, None).returncode == 0

    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    # 1. between checkpoints: update 3 done, checkpoint 2 on disk
    p = _run_subprocess(pretrain_data, run, "after_step:3")
    assert p.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    # 2. while writing checkpoint 6: its files are there but it was never renamed into place
    p = _run_subprocess(pretrain_data, run, "mid_checkpoint:6")
    assert p.returncode == -signal.SIGKILL and "resuming from" in p.stderr and "step_00000002" in p.stderr
    assert (ckpts / ".tmp-step_00000006" / "trainer.json").exists() is False
    assert (ckpts / ".tmp-step_00000006" / "model").is_dir()
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    # 3. right after checkpoint 6 was completed; the half-written folder is removed, never picked
    p = _run_subprocess(pretrain_data, run, "after_step:6")
    assert p.returncode == -signal.SIGKILL and "step_00000004" in p.stderr
    assert not (ckpts / ".tmp-step_00000006").exists()
    assert [s for s, _ in list_checkpoints(ckpts)] == [4, 6]
    # 4. finish
    p = _run_subprocess(pretrain_data, run, None)
    assert p.returncode == 0, p.stderr
    assert "step_00000006" in p.stderr

    final = "checkpoints/step_00000008"
    for name in ("model/model.safetensors", "state/model-00001-of-00001.safetensors"):
        a, b = load_file(str(reference / final / name)), load_file(str(run / final / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _timing_free(run / "metrics.jsonl") == _timing_free(reference / "metrics.jsonl")
    ref_meta = json.loads((reference / final / "trainer.json").read_text())
    assert json.loads((run / final / "trainer.json").read_text()) == ref_meta


def test_separate_validation_files(tmp_path, pretrain_data):
    corpus, _ = pretrain_data
    held_out = tmp_path / "valid.jsonl"
    held_out.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus.read_text().split("\n\n")[:40]))
    out = tmp_path / "run"
    sets = overrides(pretrain_data, out, steps=2, val_every=1) + [f"data.val_files=[{held_out}]", "data.val_fraction=0"]
    result = pretrain.run(load_config(pretrain.Config, SMOKE, sets))
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert len(list((out / "token_cache").glob("tokens-*.bin"))) == 2


def test_document_mask_trains_each_document_as_if_alone(tmp_path, pretrain_data):
    """With `data.document_mask_steps`, a window's loss is the sum of its documents' losses, each scored alone."""
    from llama2.data.packing import build_token_file, split_windows
    from llama2.model.args import ModelArgs
    from llama2.tokenizer.tokenizer import Tokenizer
    from llama2.training.losses import packed_chat_loss

    corpus, tok_path = pretrain_data
    tok = Tokenizer(tok_path)
    stream = build_token_file([corpus], tok, tmp_path / "cache").open()
    train, _ = split_windows(stream, seq_len=96, val_fraction=0.1)
    batch = collate_windows([train[0]], bos_id=tok.bos_id)
    tokens, labels, doc_ids = batch["tokens"][0], batch["labels"][0], batch["doc_ids"][0]
    starts = (tokens == tok.bos_id).nonzero().flatten().tolist()
    assert starts[0] == 0 and len(starts) >= 3  # the stream's first window opens a document; several follow
    assert doc_ids.tolist() == [sum(s <= t for s in starts) for t in range(96)]
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  max_seq_len=96, init_std=0.3))  # attention far from uniform
    model.init_weights(seed=0)
    with torch.no_grad():
        loss, _ = packed_chat_loss(model, batch)
        alone = sum(torch.nn.functional.cross_entropy(model(tokens[None, s:e])[0], labels[s:e], reduction="sum")
                    for s, e in zip(starts, [*starts[1:], 96], strict=True))
        plain = model(batch["tokens"], targets=batch["labels"])
    torch.testing.assert_close(loss * 96, alone, rtol=1e-5, atol=1e-4)
    assert not torch.isclose(plain, loss)  # without the mask, later documents see earlier ones

    out = tmp_path / "run"  # the stage: 3 steps with documents masked, then causal over the whole window
    sets = overrides(pretrain_data, out, steps=6, log_every=1) + ["data.document_mask_steps=3"]
    pretrain.run(load_config(pretrain.Config, SMOKE, sets))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows if "trained_tokens" in r] == [1, 2, 3]  # logged by the packed loss only
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_document_masked_steps_switch_at_the_same_step_after_a_resume():
    from llama2.data.sampler import ShuffledBatches

    def sampler():
        windows = [np.array([1, 5, 6, 1, 7]) for _ in range(8)]
        return ShuffledBatches(windows, partial(collate_windows, bos_id=1), 1, 2)

    batches = pretrain.DocumentMaskedSteps(sampler(), steps=2)
    masked = ["doc_ids" in next(batches) for _ in range(6)]  # 3 steps of 2 micro-batches
    assert masked == [True, True, True, True, False, False]
    state = {"seed": 0, "epoch": 0, "cursor": 2}  # after step 1
    resumed = pretrain.DocumentMaskedSteps(sampler(), steps=2)
    resumed.load_state_dict(state)
    assert ["doc_ids" in next(resumed) for _ in range(4)] == [True, True, False, False]
