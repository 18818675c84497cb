"""`llama2 tokenizer train`: a BPE model with Llama 2's trainer settings at any vocabulary size."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer with Llama 2's settings")
    actions = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train tokenizer.model on text files (.txt, or .jsonl with 'text')")
    train.add_argument("--input", nargs="+", required=True, help="training text files")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces (32000 for Llama 2)")
    train.add_argument("--out", required=True, help="output directory for tokenizer.model")
    train.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from llama2.tokenizer.tokenizer import Tokenizer
    from llama2.tokenizer.train import train_tokenizer

    start = time.perf_counter()
    path = train_tokenizer(args.input, args.out, args.vocab_size, max_sentences=args.max_sentences)
    tok = Tokenizer(path)
    print(f"wrote {path} ({tok.n_words} pieces) in {time.perf_counter() - start:.1f}s")
    return 0
