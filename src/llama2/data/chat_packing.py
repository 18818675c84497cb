"""Packing chat dialogs into fixed-length training windows for SFT and GAtt (SPEC §5).

Each dialog is encoded turn by turn (`encode_dialog_turns`); whole dialogs are placed into windows of
`max_seq_len` tokens in order, first fit, so a dialog is never split across windows and never cut inside a
turn. A dialog longer than a window keeps its longest prefix of complete turns that fits (counted as
*truncated*); one whose first turn alone does not fit is *rejected*. A dialog with no trained token left
(e.g. a Ghost Attention example whose trained last turn was cut) is reported and left out, never trained
on silently.

Labels are shifted inside each window (`labels[t]` is the target for position t), so the target at the
last token of one dialog is the next dialog's BOS, which is a prompt token and carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from llama2.tokenizer.chat_format import IGNORE_INDEX, Dialog, encode_dialog_turns
from llama2.tokenizer.tokenizer import Tokenizer


@dataclass
class PackingReport:
    dialogs: int = 0
    windows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    """Dialogs that lost their last turn(s) to fit one window."""
    rejected: int = 0
    """Dialogs whose first turn alone is longer than a window."""
    untrainable: list[int] = field(default_factory=list)
    """Indices (0-based, in input order) of dialogs left with no trained token."""

    def summary(self) -> str:
        text = (f"{self.dialogs} dialogs -> {self.windows} windows, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained); {self.truncated} truncated at a turn boundary, "
                f"{self.rejected} rejected as too long")
        if self.untrainable:
            first = ", ".join(str(i + 1) for i in self.untrainable[:5])
            text += f"; {len(self.untrainable)} with no trained token left out (first lines: {first})"
        return text


@dataclass
class PackedChat:
    """Windows of whole dialogs. Every array is (n_windows, max_seq_len)."""

    tokens: np.ndarray
    labels: np.ndarray
    """Shifted targets: labels[w, t] is the token to predict after tokens[w, t], or -100."""
    doc_ids: np.ndarray
    """Which dialog of the window each position belongs to (padding has its own id), for block attention."""
    report: PackingReport

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.tokens[i], self.labels[i], self.doc_ids[i]


def _fit(turns: list[tuple[list[int], list[int]]], max_len: int) -> tuple[list[int], list[int], int]:
    """The longest prefix of whole turns within `max_len` tokens: (ids, labels, turns dropped)."""
    ids: list[int] = []
    labels: list[int] = []
    for kept, (turn_ids, turn_labels) in enumerate(turns):
        if len(ids) + len(turn_ids) > max_len:
            return ids, labels, len(turns) - kept
        ids += turn_ids
        labels += turn_labels
    return ids, labels, 0


def pack_dialogs(
    tokenizer: Tokenizer,
    dialogs: Sequence[Dialog],
    max_seq_len: int,
    pad_id: int | None = None,
) -> PackedChat:
    """Encode and pack `dialogs` in the given order (shuffle beforehand for a random mix)."""
    pad = tokenizer.eos_id if pad_id is None else pad_id
    report = PackingReport(dialogs=len(dialogs))
    windows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for index, dialog in enumerate(dialogs):
        ids, labels, dropped = _fit(encode_dialog_turns(tokenizer, dialog), max_seq_len)
        if not ids:
            report.rejected += 1
            continue
        report.truncated += dropped > 0
        if all(label == IGNORE_INDEX for label in labels):
            report.untrainable.append(index)
            continue
        if used + len(ids) > max_seq_len:
            windows.append([])
            used = 0
        windows[-1].append((ids, labels))
        used += len(ids)
    windows = [w for w in windows if w]
    n = len(windows)
    tokens = np.full((n, max_seq_len), pad, dtype=np.int64)
    targets = np.full((n, max_seq_len), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros((n, max_seq_len), dtype=np.int64)
    for w, window in enumerate(windows):
        pos = 0
        for d, (ids, labels) in enumerate(window):
            end = pos + len(ids)
            tokens[w, pos:end] = ids
            targets[w, pos : end - 1] = labels[1:]  # shift: position t predicts token t+1 of the same dialog
            doc_ids[w, pos:end] = d
            pos = end
            report.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
        doc_ids[w, pos:] = len(window)  # padding: its own block, attends only to itself
        report.tokens += pos
    report.windows = n
    return PackedChat(tokens, targets, doc_ids, report)


def collate_chat(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """`{"tokens", "labels", "doc_ids"}`, each (B, T)."""
    tokens, labels, doc_ids = (torch.from_numpy(np.stack(x)) for x in zip(*items, strict=True))
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}
