"""Training losses as pure functions: tensors in, a scalar loss and detached statistics out.

A stage hands the engine a `LossFn`, `(model, batch) -> (loss, metrics)`: the loss is the mean over the
micro-batch (the engine divides by the number of accumulation steps), and `metrics` holds floats or 0-dim
tensors to log. The metric `"tokens"` is special: the number of input positions processed, summed (not
averaged) to report tokens/s and MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (prompts, padding): PyTorch's cross-entropy default."""

Metrics = dict[str, float | torch.Tensor]
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Metrics]]


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` (B, T, V) against `labels` (B, T), skipping IGNORE_INDEX.

    `labels[:, t]` is the token that should follow position t (already shifted by the data pipeline), so
    this function never slices: packing and chat masking decide which positions count.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    """The language-modelling `LossFn` (pretraining, SFT): batch `{"tokens": (B, T), "labels": (B, T)}`."""
    tokens, labels = batch["tokens"], batch["labels"]
    loss = next_token_cross_entropy(model(tokens), labels)  # model(tokens): (B, T, V)
    return loss, {"loss": loss.detach(), "tokens": float(tokens.numel())}


def packed_chat_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], block_diagonal: bool = True
) -> tuple[torch.Tensor, Metrics]:
    """SFT/GAtt `LossFn` on packed dialogs: batch `{"tokens", "labels", "doc_ids"}`, each (B, T).

    With `block_diagonal`, each packed dialog attends only to itself (as it will at inference); otherwise
    the window is one causal sequence, as in llama-recipes' packing.
    """
    tokens, labels, doc_ids = batch["tokens"], batch["labels"], batch["doc_ids"]
    mask = None
    if block_diagonal:
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        mask = (same & torch.ones_like(same[0]).tril())[:, None]  # (B, 1, T, T): causal within a dialog
    loss = next_token_cross_entropy(model(tokens, mask=mask), labels)
    trained = (labels != IGNORE_INDEX).sum()
    return loss, {"loss": loss.detach(), "tokens": float(tokens.numel()), "trained_tokens": trained.float()}
