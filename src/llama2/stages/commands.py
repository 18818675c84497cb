"""`llama2 pretrain|… --config FILE [--set key=value ...]`: one subcommand per training stage.

Adding a stage is one line in `STAGES`: the module must define a `Config` dataclass and `run(cfg)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = {
    "pretrain": ("llama2.stages.pretrain", "pretrain a model from scratch on text files (.txt / .jsonl)"),
    "sft": ("llama2.stages.sft", "supervised fine-tuning on chat jsonl in the Llama 2 chat format"),
    "reward": ("llama2.stages.reward", "train a helpfulness or safety reward model on preference pairs"),
    "rejection-sample": ("llama2.stages.rejection_sampling", "best-of-K sampling scored by reward models, then SFT"),
    "gatt": ("llama2.stages.gatt", "Ghost Attention: keep a system instruction over many turns"),
    "ppo": ("llama2.stages.ppo", "PPO against the safety-gated reward R_c with a KL penalty to the start policy"),
    "distill": ("llama2.stages.safety", "safety context distillation: preprompted answers, RM-targeted, fine-tuned"),
    "safety-scaling": ("llama2.stages.safety_scaling",
                       "safety SFT at 0 to 100 percent of the safety data, each evaluated"),
}
"""Subcommand → (module, one-line help)."""


def register(subparsers) -> None:
    for name, (module, help_text) in STAGES.items():
        p = subparsers.add_parser(name, help=help_text, description=f"{help_text}. Re-running the same command "
                                  "on the same out_dir resumes from its newest complete checkpoint.")
        p.add_argument("--config", required=True, metavar="FILE.yaml",
                       help="a preset, e.g. configs/pretrain/smoke.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one setting, e.g. --set train.lr=3e-4 (repeatable; types are checked)")
        p.set_defaults(func=_runner(module))


def _runner(module: str):
    def run(args: argparse.Namespace) -> int:
        from llama2.config import load_config
        from llama2.training.loop import TrainingError

        stage = importlib.import_module(module)
        try:
            result = stage.run(load_config(stage.Config, args.config, args.overrides))
        except TrainingError as exc:
            print(f"llama2 {args.command}: error: {exc}", file=sys.stderr)
            return 1
        return 130 if result.interrupted else 0

    return run
