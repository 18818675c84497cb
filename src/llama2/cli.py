"""The `llama2` command: one entry point, one subcommand module per job.

Each module listed in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func` on the parsed arguments. Modules are imported only to build the parser, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "llama2.generation.commands",
    "llama2.serving.commands",
    "llama2.export.commands",
    "llama2.tokenizer.commands",
    "llama2.data.commands",
    "llama2.stages.commands",
    "llama2.evaluation.commands",
    "llama2.evaluation.redteam_commands",
    "llama2.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2",
        description="The Llama 2 recipe end to end: pretrain, fine-tune, align, evaluate, chat and serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        # Expected user errors (bad files, configs, checkpoints) print one clear line, not a traceback.
        print(f"llama2 {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
