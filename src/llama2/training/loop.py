"""The one training engine every stage uses: a model, batches, a loss function and a `TrainConfig` in,
a trained model and a run directory out.

A stage supplies
  * the model, built and initialised (or loaded) on CPU; the engine moves it to the device and applies
    activation checkpointing, compile and FSDP from outside (`parallel.py`);
  * `batches`, an endless iterator of this process's micro-batches with `state_dict()`/`load_state_dict()`
    (`data/sampler.py` makes one from any map-style dataset), so resuming continues at the same example;
  * `loss_fn(model, batch) -> (loss, metrics)` (`losses.py`);
and calls `Trainer(...).fit()`. The engine owns everything else: AdamW with decay on matrices only, the
cosine schedule, accumulation, clipping, bf16 autocast, validation, metrics, checkpoints and exact resume.

One optimizer update ("step") consumes `global_batch_size` sequences: each of the `world_size` processes
runs `global / (micro × world_size)` micro-batches and accumulates their gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llama2.machine import native_bf16_matmul
from llama2.training.checkpointing import (
    ModelExport,
    export_safetensors,
    find_resume_point,
    load_checkpoint,
    save_checkpoint,
    truncate_log,
)
from llama2.training.faults import maybe_kill
from llama2.training.losses import LossFn
from llama2.training.parallel import ActivationCheckpointing, DistEnv, all_reduce_sum, parallelize
from llama2.training.schedule import cosine_with_warmup


@dataclass
class TrainConfig:
    """Optimizer, schedule and loop settings shared by every stage (defaults: Llama 2 pretraining, SPEC §3)."""

    steps: int = 1000
    """Optimizer updates in the whole run; the schedule decays to its floor at this step."""
    global_batch_size: int = 8
    """Sequences per update over all processes (Llama 2: 1024 × 4096 tokens = 4M tokens)."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one process; accumulation steps = global / (micro × processes)."""
    lr: float = 3e-4
    """Peak learning rate (Llama 2: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B)."""
    warmup_steps: int = 2000
    """Linear warmup updates before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine ends at this fraction of the peak and stays there."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2 (0.95 rather than PyTorch's 0.999, for stability at large batch)."""
    eps: float = 1e-5
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices only: never to norms (1-D) or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Weights and optimizer stay fp32; `bf16` runs forward/backward under bf16 autocast. `auto` picks bf16
    on CUDA and on CPUs with native bf16 matmuls (AMX/AVX512-BF16: 1.3× faster here), else fp32."""
    device: str = "auto"
    """`auto` (CUDA if available), `cpu` or `cuda`; under torchrun each process takes its local GPU."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Recompute activations in backward: `full` (each block) or `selective` (all but matmuls/attention)."""
    compile: bool = False
    """torch.compile each block: on the 2-core demo machine 18% more tokens/s on SFT's packed windows, for ~20 s
    of compiling the first time a process meets a shape (the demo's fine-tunes share one)."""
    seed: int = 0
    """Seeds python, numpy and torch at the start of a fresh run (the data order has its own seed)."""
    log_every: int = 1
    """Write a metrics.jsonl line every this many updates."""
    val_every: int = 0
    """Validate every this many updates (0: only at the end); needs validation batches from the stage."""
    val_batches: int = 8
    """Micro-batches in one validation pass over all processes (each runs its share), so the validation
    loss covers the same sequences whatever the number of processes."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many updates (0: only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints (at least 1)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to `<run>/tensorboard` (needs the `tensorboard` package)."""
    peak_tflops: float = 0.0
    """Per-device peak for MFU, in TFLOP/s; 0 measures a large matmul in the compute dtype at start."""

    def __post_init__(self) -> None:
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("steps", "global_batch_size", "micro_batch_size", "lr", "log_every",
                                 "val_batches", "keep_checkpoints") if getattr(self, name) <= 0]
        problems += [f"{name} must be non-negative, got {getattr(self, name)}"
                     for name in ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "val_every",
                                  "checkpoint_every", "peak_tflops") if getattr(self, name) < 0]
        if problems:
            raise ValueError("; ".join(problems))


def fit_batches(t: TrainConfig, n_examples: int, world_size: int, epochs: float) -> TrainConfig:
    """`t` with batch sizes `n_examples` examples can fill (small sets shrink the micro- and global batch
    rather than fail) and `steps` covering `epochs` passes over them; stages that train by epochs use it."""
    if n_examples < world_size:
        raise ValueError(f"only {n_examples} training examples for {world_size} processes")
    micro = min(t.micro_batch_size, n_examples // world_size)
    round_size = micro * world_size
    global_batch = max(round_size, min(t.global_batch_size, n_examples) // round_size * round_size)
    steps = max(1, math.ceil(epochs * n_examples / global_batch))
    return replace(t, steps=steps, micro_batch_size=micro, global_batch_size=global_batch)


class StatefulBatches(Protocol):
    """An endless iterator of micro-batches whose position can be saved and restored."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad setup); the message says why and what is intact."""


@dataclass
class TrainResult:
    step: int
    """Updates done."""
    checkpoint: Path | None
    """The last checkpoint written (or found complete)."""
    final_loss: float | None
    """Training loss of the last update run in this process (None if it resumed a finished run)."""
    val_loss: float | None
    """The last validation loss."""
    interrupted: bool
    """True if stopped by Ctrl-C/SIGTERM (a checkpoint was saved)."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Measured on a 2-core Sapphire Rapids (AMX): bf16 autocast trains the demo model 1.3× faster than fp32.
    # Without native bf16 matmuls it is ~12× slower (2-core AMD EPYC, AVX2), so fall back to fp32 there.
    return torch.bfloat16 if native_bf16_matmul() else None


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of a square matmul in `dtype`: the realistic ceiling MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up the kernel choice
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor on `device` (dicts, lists and tuples are walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    Norm gains (1-D) and embeddings are excluded: decaying a gain pulls it toward 0 and so rescales the
    layer, and decaying an embedding row penalises rare tokens that get few gradient updates. The output
    projection, although shaped like an embedding, is a matrix multiply and is decayed.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Trainer:
    """Runs `cfg.steps` updates of `model` on `batches` with `loss_fn`, writing to `run_dir`.

    `val_batches` makes a fresh iterable of validation micro-batches (same count on every process);
    `export` writes the model directory of each checkpoint (default: `model.safetensors`);
    `config_yaml` is the resolved stage config saved beside every checkpoint; `flops_per_token` enables MFU.
    Re-running on the same `run_dir` resumes from its newest complete checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: StatefulBatches,
        loss_fn: LossFn,
        cfg: TrainConfig,
        run_dir: str | Path,
        env: DistEnv,
        *,
        val_batches: Callable[[], Iterable[Any]] | None = None,
        export: ModelExport = export_safetensors,
        config_yaml: str | None = None,
        flops_per_token: float | None = None,
    ):
        round_size = cfg.micro_batch_size * env.world_size
        if cfg.global_batch_size % round_size:
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size × processes "
                f"({cfg.micro_batch_size} × {env.world_size})"
            )
        self.cfg, self.env, self.loss_fn, self.batches = cfg, env, loss_fn, batches
        self.val_batches, self.export, self.config_yaml = val_batches, export, config_yaml
        self.flops_per_token = flops_per_token
        self.accum_steps = cfg.global_batch_size // round_size
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.autocast_dtype = resolve_precision(cfg.precision, env.device)
        self.model = parallelize(model.to(env.device), env, cfg.activation_checkpointing, cfg.compile)
        self.optimizer = build_optimizer(self.model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self._signal_received = False
        self._stop_requested = False
        """Set only from the all-reduced signal flag, so every process stops after the same update."""
        self._last_checkpoint: Path | None = None
        self._tb = None

    # --- setup -------------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        """Fail before any compute if the run folder cannot be written (rather than at the first save)."""
        try:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{self.env.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise TrainingError(f"cannot write to run directory {self.run_dir}: {exc.strerror or exc}") from exc

    def _resume_or_start(self) -> None:
        # Seed first: a resumed process overwrites this with its saved state, unless it has none (the run
        # now has more processes than when it was saved).
        self._seed(self.cfg.seed + self.env.rank)
        ckpt = find_resume_point(self.ckpt_root, self.env)
        if ckpt is None:
            if self.env.is_main:
                self.metrics_path.write_text("")
            return
        meta = load_checkpoint(ckpt, self.env, self.model, self.optimizer)
        self.batches.load_state_dict(meta["data"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self._last_checkpoint = ckpt
        if self.env.is_main:
            self._truncate_metrics(self.step)
            print(f"resuming from {ckpt} (step {self.step})", file=sys.stderr)

    @staticmethod
    def _seed(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the checkpoint: those updates are replayed, and logged again, on resume."""
        truncate_log(self.metrics_path, "step", step)

    def _open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.env.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("train.tensorboard is on but the tensorboard package is not installed "
                          "(pip install tensorboard); writing metrics.jsonl only", stacklevel=2)
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    @contextlib.contextmanager
    def _stop_on_signal(self) -> Iterator[None]:
        """First Ctrl-C/SIGTERM: finish the current update, save, exit. A second one aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._signal_received:
                raise KeyboardInterrupt
            self._signal_received = True
            if self.env.is_main:
                print("\nstopping after this update to save a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # --- the loop ----------------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _train_step(self) -> dict[str, float]:
        """One update: accumulate micro-batches, clip, check the loss is finite, step. Returns its metrics."""
        cfg = self.cfg
        lr = cosine_with_warmup(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accum_steps):
            if self.env.distributed:
                # Reduce-scatter gradients only once, after the last micro-batch.
                self.model.set_requires_gradient_sync(micro == self.accum_steps - 1)
            batch = move_to(next(self.batches), self.env.device)
            with self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / self.accum_steps).backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)).item()

        # One collective for every metric and the stop flag: sums over micro-batches and processes.
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(self._signal_received))])
        totals = all_reduce_sum(self.env, totals.to(self.env.device)).cpu().tolist()
        self._stop_requested = totals[-1] > 0
        count = self.accum_steps * self.env.world_size
        out = {k: (v if k == "tokens" else v / count) for k, v in zip(keys, totals[:-1], strict=True)}
        if not (math.isfinite(out["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"the last good checkpoint is {self._last_checkpoint}" if self._last_checkpoint else \
                "no checkpoint had been written yet"
            raise TrainingError(
                f"non-finite loss at update {self.step + 1} (loss {out['loss']}, grad norm {grad_norm}); "
                f"stopped without saving, {where}. Lower train.lr or check the data, then run again."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out.update(lr=lr, grad_norm=grad_norm)
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first `val_batches` micro-batches, shared among the processes."""
        if self.val_batches is None:
            return None
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        per_process = max(1, self.cfg.val_batches // self.env.world_size)
        for i, batch in enumerate(self.val_batches()):
            if i >= per_process:
                break
            with self._autocast():
                loss, _ = self.loss_fn(self.model, move_to(batch, self.env.device))
            total += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        self.model.train()
        total = all_reduce_sum(self.env, total.to(self.env.device)).cpu()
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def save(self) -> Path:
        """Checkpoint the current step (every process must call this)."""
        state = {"data": self.batches.state_dict(), "tokens_seen": self.tokens_seen}
        self._last_checkpoint = save_checkpoint(
            self.ckpt_root, self.step, self.env, self.model, self.optimizer, state, self.export,
            self.config_yaml, self.cfg.keep_checkpoints,
        )
        return self._last_checkpoint

    def fit(self) -> TrainResult:
        """Train to `cfg.steps` (resuming if a checkpoint exists), saving as configured and at the end."""
        cfg, env = self.cfg, self.env
        self._check_writable()
        self._resume_or_start()
        self._open_tensorboard()
        peak = cfg.peak_tflops * 1e12
        if self.flops_per_token and not peak:
            peak = measure_peak_flops(env.device, self.autocast_dtype or torch.float32)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress_bar and env.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        val_loss = None
        start = window_start = time.perf_counter()
        window_tokens = 0.0
        try:
            with self._stop_on_signal():
                while self.step < cfg.steps and not self._stop_requested:
                    last = self._train_step()
                    self.tokens_seen += int(last["tokens"])
                    window_tokens += last["tokens"]
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        now = time.perf_counter()
                        tokens_per_s = window_tokens / (now - window_start) / env.world_size
                        record = {"step": self.step, **{k: v for k, v in last.items() if k != "tokens"},
                                  "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
                                  "elapsed_s": now - start}
                        if self.flops_per_token:
                            record["mfu"] = tokens_per_s * self.flops_per_token / peak
                        self._log(record)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                        tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                        window_start, window_tokens = now, 0.0
                    if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.steps:
                        val_loss = self.evaluate()
                        if val_loss is not None and env.is_main:
                            self._log({"step": self.step, "val_loss": val_loss})
                            bar.write(f"step {self.step}: val_loss {val_loss:.4f}", file=sys.stderr)
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                        self.save()
                    bar.update(1)
                    maybe_kill("after_step", self.step)
                if self._stop_requested and self.step < cfg.steps and self._saved_step() != self.step:
                    self.save()
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        if env.is_main and self._stop_requested:
            print(f"interrupted at step {self.step}; saved {self._last_checkpoint}. "
                  "Run the same command again to resume.", file=sys.stderr)
        return TrainResult(self.step, self._last_checkpoint, last.get("loss"), val_loss, self._stop_requested)

    def _saved_step(self) -> int | None:
        return int(self._last_checkpoint.name.split("_")[1]) if self._last_checkpoint else None
