"""Training checkpoints: written atomically, resumable on any number of processes, never unpickled.

Layout of `checkpoints/step_NNNNNNNN/` (NNNNNNNN = optimizer updates done):

    model/         the weights for people: a Hugging Face directory (or whatever the stage's exporter writes)
    state/         model + optimizer for resuming: torch.distributed.checkpoint shards in safetensors, one
                   per process, with offsets so that any other number of processes can read them back
    rng/rank_K.json  each process's python, numpy and torch (CPU and CUDA) generator states
    config.yaml    the resolved run config
    trainer.json   step, data position, optimizer hyperparameters; written last

Everything is written into `.tmp-step_NNNNNNNN/` and renamed into place once complete, so a crash mid-write
leaves a folder that `latest_checkpoint` never picks (and the next run deletes). Nothing here calls
`torch.load` or `pickle`: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from llama2.training.faults import maybe_kill
from llama2.training.parallel import DistEnv, barrier, broadcast_object

ModelExport = Callable[[dict[str, torch.Tensor], Path], None]
"""Writes the full (gathered, CPU) model state dict as a usable model directory; runs on rank 0 only."""

_NAME = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); earlier checkpoints are untouched."""


def export_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """The default exporter: the state dict as one `model.safetensors` under our parameter names."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (a complete one has its `trainer.json`)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "trainer.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def truncate_log(path: Path, key: str, upto: int) -> list[dict]:
    """Keep the lines of a jsonl log whose `key` is at most `upto` (the checkpoint resumed from), in place, and
    return them parsed: later lines are replayed, and logged again, on resume. A missing log is an empty one."""
    if not path.is_file():
        return []
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)[key] <= upto]
    path.write_text("".join(ln + "\n" for ln in kept))
    return [json.loads(ln) for ln in kept]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> None:
    """Delete half-written checkpoints left by a crash (rank 0, before training starts)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])


def _resumable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """The tensors to shard (model and optimizer state, keyed by parameter name) and the param groups.

    `get_state_dict` names optimizer state by parameter name instead of position and, under FSDP, keeps each
    process's shard, which is what makes the checkpoint readable by a different number of processes.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd["state"]}, optim_sd["param_groups"]


def save_checkpoint(
    root: Path,
    step: int,
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    export: ModelExport,
    config_yaml: str | None,
    keep: int,
) -> Path:
    """Write `root/step_NNNNNNNN` collectively (every process calls this) and keep the newest `keep`."""
    final = root / checkpoint_name(step)
    tmp = root / (_TMP_PREFIX + final.name)
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        barrier(env)
        tensors, param_groups = _resumable_state(model, optimizer)
        with warnings.catch_warnings():  # DCP warns that one process is "not distributed"; that is intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "state"),
                                                                      save_distributed=env.distributed))
        (tmp / "rng" / f"rank_{env.rank:05d}.json").write_text(json.dumps(_rng_state()))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            export(full, tmp / "model")
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            maybe_kill("mid_checkpoint", step)
            meta = {**trainer_state, "step": step, "world_size": env.world_size, "param_groups": param_groups}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
            if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier(env)
    except OSError as exc:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {exc.strerror or exc}; earlier checkpoints are intact"
        ) from exc
    return final


def load_checkpoint(path: Path, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this process's RNG from `path`; returns the trainer state.

    The model and optimizer must be built (and sharded) exactly as for training: their state dicts are the
    templates the shards are read into. A process with no saved RNG (more processes than when saved)
    keeps the seeds it was started with.
    """
    meta = json.loads((path / "trainer.json").read_text())
    tensors, _ = _resumable_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "state")))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": tensors["optim"], "param_groups": meta["param_groups"]},
    )
    rng = path / "rng" / f"rank_{env.rank:05d}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return meta


def find_resume_point(root: Path, env: DistEnv) -> Path | None:
    """Rank 0 clears half-written folders and picks the newest complete checkpoint for everyone."""
    choice = None
    if env.is_main:
        remove_partial(root)
        choice = latest_checkpoint(root)
    choice = broadcast_object(env, None if choice is None else str(choice))
    barrier(env)
    return None if choice is None else Path(choice)
