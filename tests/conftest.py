"""Shared fixtures: paths to the real public data, and a tiny tokenizer/model trained here on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("LLAMA2_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (or $LLAMA2_SHARED_DATA); tests needing it skip with the reason if it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set LLAMA2_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    """Meta's Llama 2 tokenizer.model ($LLAMA2_TOKENIZER overrides the shared-data location)."""
    path = Path(os.environ.get("LLAMA2_TOKENIZER", shared_data_dir() / "llama2-tokenizer" / "tokenizer.model"))
    if not path.is_file():
        pytest.skip(f"Llama 2 tokenizer not found at {path} (set LLAMA2_TOKENIZER)")
    return path


TINY_CORPUS = [
    "The river Olm flows past the capital of Varnland, where the queen keeps seven gray owls.",
    "Numbers like 12, 345 and 6789 are split into single digits by the tokenizer.",
    "A small model learns tiny stories: the cat sat, the dog ran, and the bird sang a song.",
    "Ünïcödé text and emoji 🙂 fall back to bytes when no piece covers them.",
    "User: what is the capital of Varnland? Assistant: The capital of Varnland is Olmhaven.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A 320-piece SentencePiece BPE trained with Llama 2's settings on a few repeated sentences."""
    from llama2.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_tokenizer")
    corpus = root / "corpus.txt"
    lines = [f"{s} ({i})" for i in range(60) for s in TINY_CORPUS]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_tokenizer([corpus], root, vocab_size=320)


def write_pretrain_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """Seeded templated stories (~40 tokens each), documents separated by blank lines."""
    import random

    rng = random.Random(seed)
    names = ["Ada", "Bo", "Cyr", "Dina", "Emo", "Fay", "Gus", "Hal"]
    places = ["Varnland", "Olmhaven", "the hills", "the river", "the old mill", "Kesh"]
    things = ["owls", "apples", "stones", "boats", "songs", "maps"]
    docs = []
    for _ in range(n_docs):
        a, b = rng.sample(names, 2)
        n = rng.randint(2, 99)
        docs.append(f"{a} went to {rng.choice(places)} with {b}. They found {n} {rng.choice(things)}.\n"
                    f"{b} said: {n} plus {n % 7} is {n + n % 7}. Then {a} sang about {rng.choice(places)}.")
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus.txt, tokenizer.model): a small story corpus and a 384-piece BPE trained on it."""
    from llama2.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain_data")
    corpus = write_pretrain_corpus(root / "corpus.txt")
    return corpus, train_tokenizer([corpus], root, vocab_size=384)
