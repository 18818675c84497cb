"""`llama2 data toyworld` writes the toy world's datasets; `llama2 data validate` checks a data file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="write the toy world's datasets, or validate a data file")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    toy = actions.add_parser(
        "toyworld", help="write the toy world's datasets (corpus, SFT, eval prompts, preference pairs)",
        description="Write the seeded toy world as files: pretrain.txt, sft_*.jsonl, eval_*.jsonl, "
                    "pref_{helpfulness,safety}_{train,test}.jsonl, gatt_constraints.jsonl, facts.jsonl, "
                    "manifest.json, and (unless --tokenizer-vocab 0) tokenizer/tokenizer.model. "
                    "The same seed and size give byte-identical files.")
    toy.add_argument("--out", required=True, help="output directory (created if missing)")
    toy.add_argument("--seed", type=int, default=0, help="world seed: names, facts and every dataset (default 0)")
    toy.add_argument("--size", choices=("small", "default"), default="default",
                     help="'default': >=10M-token corpus, 20k SFT dialogs, 10k pairs per set; 'small': for tests")
    toy.add_argument("--tokenizer-vocab", type=int, default=2048,
                     help="also train a SentencePiece BPE tokenizer of this many pieces on pretrain.txt "
                          "(default 2048; 0 to skip)")
    toy.set_defaults(func=_toyworld)

    val = actions.add_parser(
        "validate", help="check a data file and print counts and length statistics",
        description="Read every record of FILE. Prints counts and length statistics, or each error as "
                    "file:line: field: problem (expected ...) and exits with status 1.")
    val.add_argument("file", help="a .jsonl / .jsonl.gz / .txt file")
    val.add_argument("--kind", required=True, choices=("chat", "preference", "text"),
                     help="chat: {'messages': [...]}; preference: native pairs or Anthropic HH transcripts; "
                          "text: .txt documents or jsonl with 'text'")
    val.add_argument("--max-errors", type=int, default=50, help="stop after this many errors (default 50)")
    val.set_defaults(func=_validate)


def _toyworld(args: argparse.Namespace) -> int:
    from llama2.data.toyworld.export import write_toyworld

    start = time.perf_counter()
    out = Path(args.out)
    print(f"writing the toy world (seed {args.seed}, size {args.size}) to {out}")
    manifest = write_toyworld(out, args.seed, args.size, log=print)
    if args.tokenizer_vocab:
        from llama2.tokenizer.tokenizer import Tokenizer
        from llama2.tokenizer.train import train_tokenizer

        t = time.perf_counter()
        path = train_tokenizer([out / "pretrain.txt"], out / "tokenizer", args.tokenizer_vocab)
        tok = Tokenizer(path)
        with (out / "pretrain.txt").open(encoding="utf-8") as f:
            tokens = sum(len(ids) for ids in tok.sp_model.encode([line for line in f if line.strip()]))
        manifest["tokenizer"] = {"path": "tokenizer/tokenizer.model", "vocab_size": tok.n_words,
                                 "pretrain_tokens": tokens}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        print(f"  tokenizer/tokenizer.model        {tok.n_words} pieces; pretrain.txt is {tokens:,} tokens "
              f"({time.perf_counter() - t:.1f}s)")
    print(f"done in {time.perf_counter() - start:.1f}s; see {out / 'manifest.json'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from llama2.data.formats import validate_file

    report = validate_file(args.file, args.kind, max_errors=args.max_errors)
    if report.errors:
        for err in report.errors:
            print(err, file=sys.stderr)
        more = " (stopped; there may be more)" if len(report.errors) >= args.max_errors else ""
        print(f"{args.file}: {len(report.errors)} error(s){more}, {report.records} valid record(s)", file=sys.stderr)
        return 1
    if report.records == 0:
        print(f"{args.file}: no records (expected at least one)", file=sys.stderr)
        return 1
    print(f"{args.file}: {report.records} valid {args.kind} record(s)")
    for name, count in sorted(report.counts.items()):
        print(f"  {name}: {count}")
    for name, s in report.lengths.items():
        print(f"  {name}: min {s['min']}, mean {s['mean']}, max {s['max']}")
    return 0
