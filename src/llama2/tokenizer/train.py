"""Train a SentencePiece BPE model with Llama 2's trainer settings (SPEC §2) at any vocabulary size."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

# Llama 2's trainer_spec and normalizer_spec, read from the released tokenizer.model.
LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    character_coverage=0.99995,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def _read_lines(paths: Iterable[str | Path]) -> Iterator[str]:
    """Lines of .txt files, or the `text` field of .jsonl files."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input not found: {path}")
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as exc:
                            raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field") from exc
                        yield from text.splitlines()
            else:
                for line in f:
                    yield line.rstrip("\n")


def train_tokenizer(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    vocab_size: int,
    max_sentences: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
) -> Path:
    """Train `out_dir/tokenizer.model`; returns its path.

    Lines are fed from memory (shuffled by sentencepiece's own sampler once `max_sentences` is exceeded), so
    training is deterministic for the same inputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size < 256 + 3 + 1:
        raise ValueError(f"vocab_size must be at least 260 (256 byte pieces + 3 specials + 1), got {vocab_size}")
    lines = [ln for ln in _read_lines(inputs) if ln.strip()]
    if not lines:
        raise ValueError("tokenizer training inputs hold no text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,  # sentencepiece logs every step to stderr otherwise
        **LLAMA2_TRAINER_SETTINGS,
    )
    target = out / "tokenizer.model"
    tmp_target = target.with_suffix(".model.tmp")
    tmp_target.write_bytes(model.getvalue())
    tmp_target.replace(target)
    return target
