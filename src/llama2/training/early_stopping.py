"""Early stopping on held-out prompts (SPEC §8: PPO runs 200-400 iterations "with early stopping on held-out
prompts"): the bookkeeping, apart from how a policy is scored.

Every `every` iterations (and before the first) the trainer scores the policy on prompts it never trains on
and hands the score to `EarlyStopper.record`. The best policy so far is kept as a safetensors file; a run stops
once `patience` evaluations in a row have not beaten it by more than `min_delta`, and ends on the best policy,
which may be the starting one: a run that never improves its held-out reward gives back what it was given.

Resume: the evaluations are a jsonl file truncated to the checkpoint's iteration, like the metrics, and the
stop decision is a pure function of them, so a resumed run makes the same decisions. A best policy's file is
deleted only once a checkpoint at or after a newer best exists (`prune`), so the best of any checkpoint a run
may resume from is still on disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llama2.training.checkpointing import truncate_log

EVALUATIONS = "early_stopping.jsonl"
BEST_DIR = "early_stopping"


@dataclass
class EarlyStopping:
    """Held-out scoring and the stopping rule (off while `prompts` is empty)."""

    prompts: list[str] = field(default_factory=list)
    """Chat jsonl files of held-out prompts (each dialog ending with a user turn), never trained on."""
    max_prompts: int = 256
    """Score the first this many of them."""
    every: int = 10
    """Evaluate every this many iterations (and before the first)."""
    patience: int = 3
    """Stop after this many evaluations in a row without a new best."""
    min_delta: float = 0.0
    """A new best must beat the old one by more than this (sigmoid-scale reward)."""
    temperature: float = 0.6
    """Sampling temperature of the held-out responses (Meta's chat default); 0: greedy. Every evaluation draws
    the same random numbers, so two policies are compared on common randomness, not on luck."""
    top_p: float = 0.9
    """Nucleus cut-off of the held-out responses."""

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1 or self.max_prompts < 1:
            raise ValueError(f"early_stopping: every ({self.every}), patience ({self.patience}) and max_prompts "
                             f"({self.max_prompts}) must be at least 1")


def best_of(evaluations: Sequence[Mapping], min_delta: float) -> Mapping:
    """The best evaluation: the first one, replaced by each later one whose reward beats it by > min_delta."""
    best = evaluations[0]
    for e in evaluations[1:]:
        if e["reward"] > best["reward"] + min_delta:
            best = e
    return best


def should_stop(evaluations: Sequence[Mapping], patience: int, min_delta: float) -> bool:
    """Whether the last `patience` evaluations all came after the best one."""
    if not evaluations:
        return False
    best = best_of(evaluations, min_delta)
    return sum(e["iteration"] > best["iteration"] for e in evaluations) >= patience


class EarlyStopper:
    """The evaluations of one run directory, and the best policy's weights."""

    def __init__(self, cfg: EarlyStopping, out_dir: Path, resumed_at: int):
        self.cfg = cfg
        self.path = out_dir / EVALUATIONS
        self.best_dir = out_dir / BEST_DIR
        self.best_dir.mkdir(parents=True, exist_ok=True)
        self.evaluations: list[dict] = truncate_log(self.path, "iteration", resumed_at)

    def due(self, iteration: int) -> bool:
        """Whether the policy after `iteration` iterations is to be evaluated (and has not been)."""
        done = bool(self.evaluations) and self.evaluations[-1]["iteration"] >= iteration
        return iteration % self.cfg.every == 0 and not done

    def record(self, iteration: int, reward: float, policy_state: Mapping[str, torch.Tensor], **extra: float) -> dict:
        """Log an evaluation; keep the policy's weights when it is the new best."""
        entry = {"iteration": iteration, "reward": reward, **extra}
        self.evaluations.append(entry)
        entry["best"] = best_of(self.evaluations, self.cfg.min_delta) is entry
        if entry["best"]:
            save_file({k: v.detach().cpu().contiguous() for k, v in policy_state.items()}, str(self._file(iteration)))
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry

    def stop(self) -> bool:
        return should_stop(self.evaluations, self.cfg.patience, self.cfg.min_delta)

    def best(self) -> dict | None:
        return dict(best_of(self.evaluations, self.cfg.min_delta)) if self.evaluations else None

    def best_state(self) -> dict[str, torch.Tensor]:
        """The best policy's weights (on CPU)."""
        return load_file(str(self._file(self.best()["iteration"])))

    def prune(self) -> None:
        """After a checkpoint: drop every kept policy but the best (no resume point precedes it any more)."""
        keep = self._file(self.best()["iteration"]).name if self.evaluations else None
        for f in self.best_dir.glob("policy_*.safetensors"):
            if f.name != keep:
                f.unlink()

    def _file(self, iteration: int) -> Path:
        return self.best_dir / f"policy_{iteration:08d}.safetensors"
