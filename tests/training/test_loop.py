"""The shared engine, in one process on a tiny model: schedule, optimizer groups, accumulation, resume,
failure handling (non-finite loss, unwritable folder, full disk, Ctrl-C) and activation checkpointing."""

from __future__ import annotations

import errno
import json
import math
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llama2.data.sampler import ShuffledBatches
from llama2.model.args import ModelArgs
from llama2.model.transformer import Transformer
from llama2.training import checkpointing
from llama2.training.checkpointing import CheckpointWriteError, latest_checkpoint, list_checkpoints
from llama2.training.loop import TrainConfig, Trainer, TrainingError, build_optimizer
from llama2.training.losses import IGNORE_INDEX, causal_lm_loss, next_token_cross_entropy
from llama2.training.parallel import DistEnv, apply_activation_checkpointing
from llama2.training.schedule import cosine_with_warmup

ENV = DistEnv(rank=0, world_size=1, device=torch.device("cpu"), mesh=None)
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)


def make_model(seed: int = 0) -> Transformer:
    model = Transformer(ARGS)
    model.init_weights(seed)
    return model


def collate(rows):
    batch = torch.from_numpy(np.stack(rows))
    return {"tokens": batch[:, :-1], "labels": batch[:, 1:]}


def make_batches(micro: int = 4, global_batch: int = 8) -> ShuffledBatches:
    rng = np.random.default_rng(0)
    # A learnable stream: each token is the previous plus one (mod vocab), from random starts.
    starts = rng.integers(0, ARGS.vocab_size, size=64)
    rows = [(s + np.arange(17)) % ARGS.vocab_size for s in starts]
    return ShuffledBatches(rows, collate, micro, global_batch, seed=1)


def config(**kw) -> TrainConfig:
    base = dict(steps=6, global_batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2, precision="fp32",
                progress_bar=False, checkpoint_every=2, keep_checkpoints=3)
    return TrainConfig(**{**base, **kw})


def fit(run_dir, loss_fn=causal_lm_loss, **kw):
    trainer = Trainer(make_model(), make_batches(kw.get("micro_batch_size", 4)), loss_fn, config(**kw), run_dir, ENV)
    return trainer, trainer.fit()


def metrics(run_dir) -> list[dict]:
    timing = {"tokens_per_s", "mfu", "elapsed_s"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in timing} for ln in lines]


def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model" / "model.safetensors"))


# --- schedule, optimizer, loss ----------------------------------------------------------------------------


def test_schedule_warmup_end_mid_decay_and_floor():
    peak, warmup, total = 3e-4, 2000, 10000
    assert cosine_with_warmup(0, peak, warmup, total) == pytest.approx(peak / warmup)
    assert cosine_with_warmup(warmup - 1, peak, warmup, total) == pytest.approx(peak)
    assert cosine_with_warmup(warmup, peak, warmup, total) == pytest.approx(peak)
    mid = warmup + (total - warmup) // 2
    assert cosine_with_warmup(mid, peak, warmup, total) == pytest.approx(0.55 * peak)  # halfway: (1 + 0.1) / 2
    assert cosine_with_warmup(total, peak, warmup, total) == pytest.approx(0.1 * peak)
    assert cosine_with_warmup(10 * total, peak, warmup, total) == pytest.approx(0.1 * peak)
    values = [cosine_with_warmup(s, peak, warmup, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_on_matrices_only():
    model = make_model()
    opt = build_optimizer(model, config())
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "tok_embeddings.weight" in plain and "norm.weight" in plain and "layers.0.ffn_norm.weight" in plain
    assert "output.weight" in decayed and "layers.1.attention.wq.weight" in decayed
    assert all(name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                              "w3.weight", "output.weight")) for name in decayed)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5


def test_cross_entropy_skips_ignored_labels():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert next_token_cross_entropy(logits, labels).item() == pytest.approx(expected.item())


# --- the loop -----------------------------------------------------------------------------------------------


def test_training_lowers_loss_and_writes_metrics_and_checkpoints(tmp_path):
    trainer, result = fit(tmp_path, steps=12, lr=3e-2, keep_checkpoints=2)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert {"lr", "grad_norm", "tokens"} <= set(rows[0]) and rows[-1]["tokens"] == 12 * 8 * 16
    raw = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert raw["tokens_per_s"] > 0 and "elapsed_s" in raw
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [10, 12]  # keep the newest 2
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert result.checkpoint == ckpt and result.step == 12
    assert {p.name for p in ckpt.iterdir()} == {"model", "state", "rng", "trainer.json"}
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 12 and meta["data"]["cursor"] % 8 == 0 and meta["world_size"] == 1
    # The exported weights are the trained ones.
    exported = weights(ckpt)
    for name, p in trainer.model.state_dict().items():
        if not name.startswith("rope_"):
            assert torch.equal(exported[name], p)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    fit(tmp_path / "a", micro_batch_size=8)
    fit(tmp_path / "b", micro_batch_size=2)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_resume_in_process_is_bit_exact(tmp_path):
    _, full = fit(tmp_path / "full")
    fit(tmp_path / "split", steps=6, checkpoint_every=4)
    # Pretend the run died after step 4: drop the final checkpoint and resume on the same folder.
    for step, path in list_checkpoints(tmp_path / "split" / "checkpoints"):
        if step > 4:
            import shutil

            shutil.rmtree(path)
    _, resumed = fit(tmp_path / "split", checkpoint_every=4)
    assert resumed.step == 6
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    a, b = weights(full.checkpoint), weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_not_trained_again(tmp_path):
    fit(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    _, again = fit(tmp_path)
    assert again.step == 6 and again.final_loss is None
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding(model, batch):
        calls["n"] += 1
        loss, m = causal_lm_loss(model, batch)
        return (loss * math.nan if calls["n"] > 2 * 3 else loss), m  # update 4 (2 micro-batches each)

    with pytest.raises(TrainingError, match=r"non-finite loss at update 4.*last good checkpoint is .*step_00000002"):
        fit(tmp_path, loss_fn=exploding)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoints" / "step_00000002").values())


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="cannot write to run directory"):
        fit(blocker / "run")


def test_full_disk_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    real_export = checkpointing.export_safetensors
    calls = {"n": 0}

    def export(state, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_export(state, path)

    trainer = Trainer(make_model(), make_batches(), causal_lm_loss, config(), tmp_path, ENV, export=export)
    with pytest.raises(CheckpointWriteError, match="No space left on device; earlier checkpoints are intact"):
        trainer.fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tmp_path):
    calls = {"n": 0}

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # during update 3
            signal.raise_signal(signal.SIGINT)
        return causal_lm_loss(model, batch)

    before = signal.getsignal(signal.SIGINT)
    _, result = fit(tmp_path, loss_fn=interrupting, checkpoint_every=0)
    assert result.interrupted and result.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    _, resumed = fit(tmp_path, checkpoint_every=0)
    assert resumed.step == 6 and not resumed.interrupted


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients_and_names(mode):
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16))
    grads = []
    for ac in ("none", mode):
        model = make_model()
        apply_activation_checkpointing(model, ac)
        causal_lm_loss(model, {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})[0].backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
        if ac != "none":
            assert set(model.state_dict()) == set(make_model().state_dict())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
