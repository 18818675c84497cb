"""`llama2 redteam --model DIR --prompts FILE [--baseline DIR] [--judge oracle|rm:DIR] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("redteam", help="red-team a chat model with adversarial prompts (violation rates)",
                              description="Answer adversarial prompts, judge each answer's safety and report the "
                              "violation rate per risk category and attack vector; with --baseline, also the share "
                              "of the prompts that broke the baseline which the model now handles safely.")
    p.add_argument("--model", type=Path, required=True, help="chat model (model or run directory)")
    p.add_argument("--prompts", type=Path, required=True,
                   help="chat jsonl ending with a user turn, e.g. the toy world's eval_adversarial.jsonl")
    p.add_argument("--baseline", type=Path, default=None, help="an earlier model to compare with")
    p.add_argument("--judge", default="oracle", help="'oracle' (toy-world safety judge) or 'rm:DIR' (safety RM)")
    p.add_argument("--out", type=Path, default=Path("runs/redteam"), help="folder for redteam.json and .md")
    p.add_argument("--limit", type=int, default=None, help="use at most N prompts")
    p.add_argument("--max-gen-len", type=int, default=64, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--world-seed", type=int, default=0,
                   help="toy world for the oracle judge and for categorising prompts without meta")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from llama2.data.toyworld import ToyWorld
    from llama2.evaluation.redteam import (
        RedTeamSettings,
        judge_for,
        load_redteam_prompts,
        markdown,
        red_team,
        write_report,
    )
    from llama2.generation.llama import Llama
    from llama2.stages.artifacts import model_dir
    from llama2.stages.safety import fits_context

    world = ToyWorld(args.world_seed)
    judge, threshold, judge_name = judge_for(args.judge, world, args.batch_size)
    prompts = load_redteam_prompts(args.prompts, world, args.limit)
    if not prompts:
        raise ValueError(f"{args.prompts}: holds no prompts")
    settings = RedTeamSettings(max_gen_len=args.max_gen_len, temperature=args.temperature,
                               batch_size=args.batch_size, seed=args.seed)
    llm = Llama.load(model_dir(args.model), device=args.device)
    baseline = Llama.load(model_dir(args.baseline), device=args.device) if args.baseline else None
    fitting = [p for p in prompts if all(fits_context(m, p.messages, args.max_gen_len) for m in (llm, baseline) if m)]
    if not fitting:
        raise ValueError(f"{args.prompts}: no prompt leaves room for {args.max_gen_len} answer tokens in the context")
    if len(fitting) < len(prompts):
        print(f"redteam: {len(prompts) - len(fitting)} prompt(s) left out: too long for the model's context",
              file=sys.stderr)
    report = red_team(llm, fitting, judge, threshold, settings, baseline, judge_name)
    report.update(skipped_too_long=len(prompts) - len(fitting), model_dir=str(model_dir(args.model)),
                  prompts_file=str(args.prompts),
                  baseline_dir=str(model_dir(args.baseline)) if args.baseline else None)
    write_report(report, args.out)
    sys.stdout.write(markdown(report))
    print(f"redteam: report in {args.out / 'redteam.json'} and {args.out / 'redteam.md'}", file=sys.stderr)
    return 0
