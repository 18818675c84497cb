"""Reward models as the RLHF stages use them (rejection sampling now, PPO next): load, score, combine, gate.

* `load_reward_model(dir)` → `RewardModel`, whose batched `score(dialogs, responses)` gives sigmoid-scale
  scores (the scale of the paper's 0.15 and 0.5 thresholds) and `rewards(...)` the raw ones before sigmoid.
* `combined_score` is SPEC §8's piecewise R_c: the safety score when the prompt is tagged safety or the
  safety score is below 0.15, else the helpfulness score.
* `check_rm_gate` refuses a reward model whose recorded held-out accuracy (`rm_eval.json`, written by
  `llama2 reward`) is below a threshold: optimising against a weak RM only teaches the policy its errors.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.generation.llama import find_tokenizer
from llama2.model.heads import ScalarHeadModel, load_scalar_head
from llama2.stages.artifacts import model_dir
from llama2.tokenizer.chat_format import Dialog, encode_dialog
from llama2.tokenizer.tokenizer import Tokenizer

SAFETY_THRESHOLD = 0.15
"""R_c switches to the safety score below this sigmoid-scale safety score (SPEC §8: precision 0.89, recall 0.55)."""
RM_EVAL_FILE = "rm_eval.json"
"""Where `llama2 reward` records its held-out evaluation, in the run folder and in the exported model folder."""


def encode_scored(tokenizer: Tokenizer, prompt: Dialog, response: str,
                  max_len: int | None = None) -> tuple[list[int], int]:
    """(ids, response start): the ids a reward model reads, the prompt as the policy saw it (`encode_dialog`)
    + `response </s>`, and the index of the response's first id (a likelihood-gated RM reads only those).

    This is the inference layout, so a policy's sampled ids can be scored as generated. Longer than
    `max_len`: BOS plus the last `max_len − 1` ids, which keeps the response, its end and the nearest context.
    """
    prompt_ids = encode_dialog(tokenizer, prompt)
    ids = prompt_ids + tokenizer.encode(f"{response.strip()} ", bos=False, eos=True)
    start = len(prompt_ids)
    if max_len is not None and len(ids) > max_len:
        start = max(1, start - (len(ids) - max_len))
        ids = ids[:1] + ids[len(ids) - max_len + 1:]
    return ids, start


def pad_id_for(tokenizer: Tokenizer) -> int:
    """Llama's tokenizer has no pad piece; `<unk>` never occurs in byte-fallback output, so it pads safely."""
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.sp_model.unk_id()


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) right-padded with `pad_id`, lengths (B,))."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return tokens, lengths


@dataclass
class RewardModel:
    """A loaded reward model with its tokenizer: batched scoring of (dialog, response) pairs."""

    model: ScalarHeadModel
    tokenizer: Tokenizer
    pad_id: int
    path: Path

    @property
    def device(self) -> torch.device:
        return self.model.score.weight.device

    @torch.inference_mode()
    def rewards_for_ids(self, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                        batch_size: int = 16) -> list[float]:
        """Raw rewards (before sigmoid) of already-encoded sequences and their response starts (`encode_scored`)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
        values = [0.0] * len(sequences)
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            tokens, lengths = right_pad([sequences[i] for i in chunk], self.pad_id)
            first = torch.tensor([starts[i] for i in chunk], device=self.device)
            scores = self.model(tokens.to(self.device), lengths.to(self.device), first).tolist()
            for i, s in zip(chunk, scores, strict=True):
                values[i] = s
        return values

    def rewards(self, dialogs: Sequence[Dialog], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """Raw rewards r(x, y), one per (prompt dialog ending with a user turn, response)."""
        if len(dialogs) != len(responses):
            raise ValueError(f"{len(dialogs)} dialogs but {len(responses)} responses")
        max_len = self.model.args.max_seq_len
        encoded = [encode_scored(self.tokenizer, d, r, max_len) for d, r in zip(dialogs, responses, strict=True)]
        return self.rewards_for_ids([ids for ids, _ in encoded], [start for _, start in encoded], batch_size)

    def score(self, dialogs: Sequence[Dialog], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """Sigmoid-scale scores in (0, 1), the scale of the paper's thresholds (0.15 for R_c, 0.5 unsafe)."""
        return [sigmoid(r) for r in self.rewards(dialogs, responses, batch_size)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def load_reward_model(path: str | Path, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> RewardModel:
    """A reward model from its HF sequence-classification directory or from an RM run directory."""
    source = model_dir(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, pad_id = load_scalar_head(source, device, dtype)
    return RewardModel(model, Tokenizer(find_tokenizer(source)), pad_id, source)


def combined_score(helpfulness: torch.Tensor, safety: torch.Tensor, is_safety_prompt: torch.Tensor,
                   threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """SPEC §8's R_c on the sigmoid scale, elementwise: R_s if IS_SAFETY(p) or R_s < threshold, else R_h."""
    return torch.where(is_safety_prompt | (safety < threshold), safety, helpfulness)


# --- the gate ----------------------------------------------------------------------------------------------


class WeakRewardModelError(RuntimeError):
    """A reward model below the accuracy gate (or without a recorded evaluation) was refused."""


def recorded_accuracy(path: str | Path) -> float | None:
    """The held-out accuracy `llama2 reward` recorded for this RM (model or run folder); None if none."""
    path = Path(path)
    candidates = [path / RM_EVAL_FILE]
    with contextlib.suppress(FileNotFoundError):
        candidates.append(model_dir(path) / RM_EVAL_FILE)
    for file in candidates:
        if file.is_file():
            return float(json.loads(file.read_text())["accuracy"])
    return None


def check_rm_gate(path: str | Path, min_accuracy: float, allow_weak: bool) -> float | None:
    """The RM's recorded accuracy, or `WeakRewardModelError` if it is missing or below `min_accuracy` and
    `allow_weak` is off (with it on, the same finding is returned for the caller to print as a warning)."""
    accuracy = recorded_accuracy(path)
    if accuracy is not None and accuracy >= min_accuracy:
        return accuracy
    if allow_weak:
        return accuracy
    found = "no recorded evaluation (rm_eval.json)" if accuracy is None else f"held-out accuracy {accuracy:.3f}"
    raise WeakRewardModelError(
        f"reward model {path}: {found}, below the gate of {min_accuracy:.3f}. Train it longer or on more data, "
        "evaluate it (llama2 reward writes rm_eval.json), or set allow_weak_rm: true to use it anyway."
    )
