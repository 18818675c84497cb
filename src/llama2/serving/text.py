"""Turning generated ids into the text a client may see: incremental detokenization and stop sequences.

Both work push-style (one id or one text piece at a time) because the batching worker advances many
sequences in lock-step and must decide after every token whether a sequence is finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llama2.tokenizer.tokenizer import Tokenizer


@dataclass
class IncrementalDetokenizer:
    """The text added by each new id (the push form of `generation.llama.detokenize_stream`).

    The whole sequence is decoded each time because SentencePiece drops the leading space of the first
    piece and merges byte pieces; an incomplete UTF-8 character (decoded as U+FFFD) is held back.
    """

    tokenizer: Tokenizer
    ids: list[int] = field(default_factory=list)
    emitted: str = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self) -> str:
        """What is left once the sequence ends (a dangling partial character, decoded as best it can be)."""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted) :] if len(text) > len(self.emitted) else ""
        self.emitted = text
        return delta


@dataclass
class StopMatcher:
    """Cuts the text at the first stop sequence, holding back any tail that might begin one."""

    stops: Sequence[str]
    held: str = ""

    def push(self, text: str) -> tuple[str, bool]:
        """`(text safe to emit now, whether a stop sequence was found)`."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
