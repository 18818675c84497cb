"""`llama2 eval --model DIR --task NAME[,NAME] [--data PATH] [--json OUT]`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on named tasks (see --list)")
    p.add_argument("--model", type=Path, help="checkpoint directory (Hugging Face or Meta format)")
    p.add_argument("--task", help="comma-separated task names")
    p.add_argument("--data", type=Path, default=None, help="input file or folder for the task (task default if unset)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples per task")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling examples and generations")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--out", type=Path, default=None, help="folder for plots and per-example outputs")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task-specific setting")
    p.add_argument("--list", action="store_true", help="list the known tasks and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from llama2.evaluation.registry import EvalContext, get_task, tasks

    if args.list:
        for name, fn in sorted(tasks().items()):
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"{name:24s} {doc[0] if doc else ''}")
        return 0
    if not args.model or not args.task:
        raise ValueError("--model and --task are required (or --list)")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = value
    names = [n.strip() for n in args.task.split(",") if n.strip()]
    fns = {name: get_task(name) for name in names}  # unknown names fail before any work starts
    ctx = EvalContext(args.model, args.data, args.limit, args.seed, args.device, args.batch_size, args.out, options)
    results = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        results[name] = fn(ctx)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {json.dumps(results[name], default=str)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
