"""The evaluation tasks `llama2 eval` knows, by name.

A task is a function `(EvalContext) -> dict` registered with `@task("name")` in a module listed in
`TASK_MODULES`; it returns JSON-ready metrics (and may write files under `ctx.out_dir`). Modules are imported
only when the registry is first used, so `llama2 --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

TASK_MODULES: list[str] = [
    "llama2.evaluation.benchmarks",
    "llama2.evaluation.gsm8k",
    "llama2.evaluation.win_rate",
    "llama2.evaluation.rewards",
    "llama2.evaluation.safety_benchmarks",
    "llama2.evaluation.dialogue",
    "llama2.evaluation.safety",
]

TaskFn = Callable[["EvalContext"], dict[str, Any]]
_TASKS: dict[str, TaskFn] = {}


@dataclass
class EvalContext:
    """What every task gets: the model directory (loaded on first use), an optional data path and settings."""

    model_dir: Path
    data: Path | None = None
    """A task's input file or folder; each task documents its default (usually under ../shared/data)."""
    limit: int | None = None
    """Evaluate at most this many examples (sampled reproducibly by `seed`); None for all."""
    seed: int = 0
    device: str | None = None
    batch_size: int = 16
    out_dir: Path | None = None
    """Where tasks may write plots or per-example files."""
    options: dict[str, str] = field(default_factory=dict)
    """Task-specific `--option key=value` settings."""

    @cached_property
    def llm(self):
        import torch

        from llama2.generation.llama import Llama
        from llama2.stages.artifacts import model_dir

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return Llama.load(model_dir(self.model_dir), device=device)


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    def register(fn: TaskFn) -> TaskFn:
        if name in _TASKS:
            raise ValueError(f"evaluation task {name!r} is registered twice")
        _TASKS[name] = fn
        return fn

    return register


def tasks() -> dict[str, TaskFn]:
    for module in TASK_MODULES:
        importlib.import_module(module)
    return dict(_TASKS)


def get_task(name: str) -> TaskFn:
    known = tasks()
    if name not in known:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(sorted(known)) or '(none)'}")
    return known[name]
