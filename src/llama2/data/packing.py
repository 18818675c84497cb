"""Pretraining data: text files → one memory-mapped token stream → fixed windows of `seq_len + 1` tokens.

Documents are `.txt` files (documents separated by blank lines) or `.jsonl` files (one `{"text": ...}` per
line). Each is encoded as `BOS ids EOS` and all are concatenated, so windows cross document boundaries and no
token is wasted on padding (llama2.c and most pretraining code do the same). Tokenizing is done once: the
stream is cached under a key made of the input files (path, size, modification time) and the tokenizer
file's hash, and is rebuilt when any of them changes. Window `i` is tokens `[i·L, i·L + L + 1)`: inputs are
its first L tokens and labels its last L, so consecutive windows share one boundary token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama2.tokenizer.tokenizer import Tokenizer

CACHE_FORMAT = 1
"""Bumped when the token file layout changes, so stale caches are never read."""


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one `.txt` (blank-line separated) or `.jsonl` (`text` field) file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field") from exc
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: 'text' must be a string")
                yield text
    elif path.suffix == ".txt":
        paragraph: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
        if paragraph:
            yield "\n".join(paragraph)
    else:
        raise ValueError(f"{path}: pretraining files must be .txt or .jsonl")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(paths: Sequence[Path], tokenizer: Tokenizer) -> str:
    """Changes whenever an input file (path, size, mtime) or the tokenizer model changes."""
    h = hashlib.sha256(f"format={CACHE_FORMAT};tokenizer={_file_digest(tokenizer.model_path)}".encode())
    for p in paths:
        st = p.stat()
        h.update(f";{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


@dataclass
class TokenFile:
    """A cached token stream: `path` holds `n_tokens` values of `dtype`, readable with `np.memmap`."""

    path: Path
    n_tokens: int
    dtype: str

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def build_token_file(inputs: Iterable[str | Path], tokenizer: Tokenizer, cache_dir: str | Path) -> TokenFile:
    """Tokenize `inputs` into `cache_dir/tokens-KEY.bin` unless a complete file for KEY is there already.

    The `.json` sidecar is written last (both via a temporary name and a rename), so an interrupted build
    leaves no file that looks complete.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no pretraining data files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"pretraining data file not found: {p}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, tokenizer)
    bin_path, meta_path = cache / f"tokens-{key}.bin", cache / f"tokens-{key}.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TokenFile(bin_path, meta["n_tokens"], meta["dtype"])

    dtype = np.uint16 if tokenizer.n_words <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp_bin = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
    n_tokens = 0
    with tmp_bin.open("wb") as out:
        for p in paths:
            for doc in read_documents(p):
                ids = np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=dtype)
                out.write(ids.tobytes())
                n_tokens += len(ids)
    if n_tokens == 0:
        tmp_bin.unlink()
        raise ValueError(f"pretraining data holds no text: {', '.join(map(str, paths))}")
    tmp_bin.replace(bin_path)
    meta = {"n_tokens": n_tokens, "dtype": np.dtype(dtype).name, "inputs": [str(p) for p in paths],
            "tokenizer": str(tokenizer.model_path), "vocab_size": tokenizer.n_words}
    tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_meta.replace(meta_path)
    return TokenFile(bin_path, n_tokens, meta["dtype"])


class PackedWindows(Sequence[np.ndarray]):
    """Windows `first … first + count − 1` of `seq_len + 1` tokens over a token stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, first: int, count: int):
        self.tokens, self.seq_len, self.first, self.count = tokens, seq_len, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(i)
        start = (self.first + i) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)


def all_windows(tokens: np.ndarray, seq_len: int) -> PackedWindows:
    """Every whole window of the stream (a separate validation file, for instance)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than one window of {seq_len} + 1")
    return PackedWindows(tokens, seq_len, 0, n)


def split_windows(tokens: np.ndarray, seq_len: int, val_fraction: float) -> tuple[PackedWindows, PackedWindows]:
    """Train and validation windows: the validation set is the stream's tail (at least one window when
    `val_fraction` > 0), so it never overlaps training text except for one boundary token."""
    n = (len(tokens) - 1) // seq_len
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(
            f"the token stream ({len(tokens)} tokens) is too short for windows of {seq_len} + 1 tokens "
            f"with {n_val} held out for validation"
        )
    return PackedWindows(tokens, seq_len, 0, n - n_val), PackedWindows(tokens, seq_len, n - n_val, n_val)


def collate_windows(windows: list[np.ndarray], bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """`{"tokens": (B, L), "labels": (B, L)}` with labels the next token of every input position. With
    `bos_id`, also `"doc_ids"` (B, L): which document of the window each position belongs to, counted from
    the BOS that opens each one (positions before the window's first BOS finish a document begun earlier)."""
    batch = torch.from_numpy(np.stack(windows))  # (B, L + 1)
    tokens = batch[:, :-1]
    if bos_id is None:
        return {"tokens": tokens, "labels": batch[:, 1:]}
    return {"tokens": tokens, "labels": batch[:, 1:], "doc_ids": torch.cumsum(tokens == bos_id, dim=1)}
