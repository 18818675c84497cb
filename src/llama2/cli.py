"""The `llama2` command: one entry point, one subcommand module per job.

Each module listed in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func` on the parsed arguments. Modules are imported only to build the parser, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
        code = int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # its message, when it has one, says how to resume
        print(f"\ninterrupted: {exc}" if str(exc) else "\ninterrupted", file=sys.stderr)
        code = 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        # Expected user errors (bad files, configs, checkpoints) print one clear line, not a traceback.
        print(f"llama2 {args.command}: error: {exc}", file=sys.stderr)
        code = 1
    from llama2.training.parallel import launched_as_group  # after the command: torch is loaded by then

    if launched_as_group():
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End one of a process group's processes without interpreter finalization. Its work is done and written
    (every process met at the run's closing barrier and left the process group), but finalization still
    destroys whatever torch objects gloo's C++ threads reference, and twice in CI that aborted a worker after a
    complete run ("terminate called without an active exception", exit -6), failing the whole torchrun job.
    Upstream knows the hazard (pytorch/pytorch#179291, #190489) and has no fix; the files are closed already."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
