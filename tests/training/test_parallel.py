"""FSDP2 under torchrun on CPU (gloo): two processes train like one, and checkpoints move between them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama2.config import load_config
from llama2.stages import pretrain
from llama2.training.faults import ENV_VAR

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "smoke.yaml"
STEPS = 6


def overrides(pretrain_data, out: Path, cache: Path) -> list[str]:
    corpus, tok = pretrain_data
    return [f"out_dir={out}", f"data.train_files=[{corpus}]", f"data.tokenizer={tok}", f"data.cache_dir={cache}",
            "model.max_seq_len=64", f"train.steps={STEPS}", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.checkpoint_every=3", "train.keep_checkpoints=2",
            "train.val_every=3", "train.precision=fp32", "train.progress_bar=false", "train.peak_tflops=1"]


def run_one(pretrain_data, out: Path, cache: Path) -> None:
    pretrain.run(load_config(pretrain.Config, SMOKE, overrides(pretrain_data, out, cache)))


def run_two(pretrain_data, out: Path, cache: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llama2.cli", "pretrain", "--config", str(SMOKE)]
    for s in overrides(pretrain_data, out, cache):
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_resume_across_world_sizes(tmp_path, pretrain_data):
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    run_one(pretrain_data, one, cache)
    run_two(pretrain_data, two, cache)
    assert_close(losses(one), losses(two))  # same global batch: 1 × (2 micro-batches of 4) vs 2 × (1 of 4)
    assert len(losses(one)) == STEPS
    assert_close(val_losses(one), val_losses(two))
    shards = sorted(p.name for p in (two / "checkpoints" / "step_00000003" / "state").iterdir())
    assert len([s for s in shards if s.startswith("shard-")]) == 2  # each process wrote its own shard

    # Written by 2 processes, resumed by 1 ...
    two_to_one = tmp_path / "two_to_one"
    copy_checkpoint(two, two_to_one, 3)
    run_one(pretrain_data, two_to_one, cache)
    assert_close(losses(two_to_one), {s: v for s, v in losses(one).items() if s > 3})
    # ... and written by 1, resumed by 2.
    one_to_two = tmp_path / "one_to_two"
    copy_checkpoint(one, one_to_two, 3)
    run_two(pretrain_data, one_to_two, cache)
    assert_close(losses(one_to_two), {s: v for s, v in losses(one).items() if s > 3})

    reference = final_weights(one)
    for run in (two, two_to_one, one_to_two):
        weights = final_weights(run)
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)


def test_compiled_blocks_take_a_second_sequence_length():
    """Blocks compiled for one length are recompiled with a dynamic length for the next; causal attention must
    not hang on a test of that symbolic length (SDPA refuses a SymBool `is_causal`)."""
    from llama2 import ModelArgs, Transformer
    from llama2.training.parallel import apply_compile

    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = [model(tokens[:, :n]) for n in (8, 16)]
        apply_compile(model)
        for n, expected in zip((8, 16), eager, strict=True):
            torch.testing.assert_close(model(tokens[:, :n]), expected, rtol=1e-4, atol=1e-4)
