"""SentencePiece tokenizer with Meta's interface: `encode(s, bos, eos)`, `decode`, and the special ids."""

from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path} (expected a SentencePiece .model file)")
        self.model_path = path
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a valid SentencePiece model ({exc})") from exc
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp_model.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp_model.id_to_piece(i)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, n_words={self.n_words})"
