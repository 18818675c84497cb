"""Parallelism applied to a built model from outside: activation checkpointing → compile → FSDP2.

The model code knows nothing of any of this (torchtitan's `parallelize_llama` order, which it explains:
compile each block after wrapping it for activation checkpointing and before sharding, so the compiled graph
sees the checkpoint boundary and FSDP's hooks stay outside it). Under `torchrun` every process holds one
shard of every block (`fully_shard` on each block and on the root, over a 1-D device mesh; NCCL on GPUs,
gloo on CPUs). Without `torchrun` it is one plain process and nothing is wrapped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

ActivationCheckpointing = Literal["none", "full", "selective"]


@dataclass
class DistEnv:
    """Where this process sits: its rank among `world_size` processes, its device and the FSDP mesh."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    """The 1-D mesh FSDP shards over; None in a single plain process."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files every process would otherwise write alike (metrics, HF export)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; under torchrun each process takes its LOCAL_RANK's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def launched_as_group() -> bool:
    """Was this process started as one of several (`torchrun` sets WORLD_SIZE)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the `torchrun` process group if launched as one of several processes, else a single process."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not launched_as_group():
        return DistEnv(rank=0, world_size=1, device=dev, mesh=None)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp_shard",))
    return DistEnv(rank=dist.get_rank(), world_size=world, device=dev, mesh=mesh)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_run(device: str = "auto") -> Iterator[DistEnv]:
    """A run's process group: joined on entry, left on exit. A run that succeeds first waits at a barrier for
    every process: once, in CI, a process that tore down its gloo connections while its peer was still
    finishing made the peer abort ("terminate called without an active exception"). After an error it does
    not wait (a failed peer would never arrive) and only leaves."""
    env = init_distributed(device)
    try:
        yield env
        barrier(env)
    finally:
        close_distributed()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over processes (in place and returned); a no-op in one process."""
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(env: DistEnv, obj):
    """Rank 0's `obj` on every process (small Python objects: a path, a step number)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Ops whose outputs selective checkpointing keeps: the matmuls and attention, which are costly to redo.
# Everything else in a block (RMSNorm, rotary, SiLU, residual adds) is cheap and is recomputed.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: ActivationCheckpointing) -> None:
    """Wrap every block of `model.layers` so its activations are recomputed in the backward pass.

    `full` keeps only each block's input (least memory, one extra forward); `selective` keeps the matmul
    and attention outputs and recomputes only the elementwise ops (most of the saving for little compute).
    Parameter names are unchanged: the wrapper strips its prefix from state dicts.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing must be none, full or selective, got {mode!r}")
    for i, block in enumerate(model.layers):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context = partial(create_selective_checkpoint_contexts, _selective_policy)
            wrapped = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        model.layers[i] = wrapped


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (same module tree and parameter names); blocks share one graph."""
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2: shard each block, then the root (embedding, final norm, output) over `mesh`.

    Every block but the last frees its gathered parameters after forward (they are gathered again for
    backward); the last block's are used by backward straight away, so keeping them saves one all-gather.
    """
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh)


def parallelize(
    model: nn.Module, env: DistEnv, activation_checkpointing: ActivationCheckpointing = "none", compile: bool = False
) -> nn.Module:
    """Apply AC → compile → FSDP (that order; see the module docstring) to a model on `env.device`."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if env.mesh is not None:
        apply_fsdp(model, env.mesh)
    return model
