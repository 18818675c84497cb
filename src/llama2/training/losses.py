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

from llama2.data.formats import RATINGS

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (prompts, padding): PyTorch's cross-entropy default."""

Metrics = dict[str, float | torch.Tensor]
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Metrics]]


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` (..., V) against `labels` (...), e.g. (B, T, V) and (B, T) or the kept
    positions' (N, V) and (N,), skipping IGNORE_INDEX.

    `labels[:, t]` is the token that should follow position t (already shifted by the data pipeline), so
    this function never slices: packing and chat masking decide which positions count.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    """The language-modelling `LossFn` (pretraining, SFT): batch `{"tokens": (B, T), "labels": (B, T)}`."""
    tokens, labels = batch["tokens"], batch["labels"]
    loss = model(tokens, targets=labels)  # the model's fused output layer and cross-entropy
    return loss, {"loss": loss.detach(), "tokens": float(tokens.numel())}


def packed_chat_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], block_diagonal: bool = True
) -> tuple[torch.Tensor, Metrics]:
    """`LossFn` on windows of packed documents (SFT/GAtt dialogs, or pretraining text with
    `document_mask_steps`): batch `{"tokens", "labels", "doc_ids"}`, each (B, T).

    With `block_diagonal`, each packed document attends only to itself (as a dialog will at inference);
    otherwise the window is one causal sequence, as in llama-recipes' packing.
    """
    tokens, labels, doc_ids = batch["tokens"], batch["labels"], batch["doc_ids"]
    mask = None
    if block_diagonal:
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        mask = (same & torch.ones_like(same[0]).tril())[:, None]  # (B, 1, T, T): causal within a dialog
    # the model's loss skips the IGNORE_INDEX positions (every prompt token) before its output layer
    loss = model(tokens, mask=mask, targets=labels)
    trained = (labels != IGNORE_INDEX).sum().float()
    return loss, {"loss": loss.detach(), "tokens": float(tokens.numel()), "trained_tokens": trained}


# --- reward models (SPEC §7) ----------------------------------------------------------------------------------

MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True)),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}
"""Margin m(rating) per mode, the paper's Table 27 (significantly better, better, slightly, negligibly)."""


def rating_margin(rating: str | None, mode: str) -> float:
    """m(rating) for `mode` ("none", "small", "large"); 0 for pairs without a rating (Anthropic HH)."""
    if mode not in MARGINS:
        raise ValueError(f"margin mode must be one of {', '.join(MARGINS)}, got {mode!r}")
    return 0.0 if rating is None else MARGINS[mode][rating]


def preference_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor
) -> tuple[torch.Tensor, Metrics]:
    """Binary ranking loss with margin, `-log σ(r_c − r_r − m)` averaged over pairs (Llama 2 eq. 2).

    `chosen`, `rejected`, `margin`: (B,). Metrics: `accuracy` (r_c > r_r, a tie counts half) and
    `reward_margin`, the mean r_c − r_r the model achieves (what the margin term asks to exceed m).
    """
    gap = chosen - rejected
    loss = -F.logsigmoid(gap - margin).mean()
    accuracy = ((gap > 0).float() + 0.5 * (gap == 0).float()).mean()
    return loss, {"accuracy": accuracy.detach(), "reward_margin": gap.mean().detach()}


def safety_auxiliary_loss(rewards: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Safety RM auxiliary term (the paper gives no formula, SPEC §7): binary cross-entropy of σ(r) against
    the response's safe/unsafe label, `-[s·log σ(r) + (1−s)·log(1−σ(r))]`, averaged over labelled responses.

    It pulls unsafe responses below r = 0 (score 0.5) and safe ones above it, which is what the unsafe-recall
    metric at score 0.5 counts. `rewards`, `safe`: (N,); `safe` is 1 safe, 0 unsafe, −1 unlabelled.
    """
    labelled = safe >= 0
    if not bool(labelled.any()):
        return rewards.sum() * 0.0  # keeps the graph (and FSDP's collectives) identical across micro-batches
    return F.binary_cross_entropy_with_logits(rewards[labelled], safe[labelled].float())


def reward_model_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], safety_weight: float = 0.0
) -> tuple[torch.Tensor, Metrics]:
    """The reward-model `LossFn`: batch `{"tokens": (2B, T), "lengths": (2B,), "starts": (2B,), "margin": (B,),
    "safe": (2B,)}`, chosen rows first then rejected rows, right-padded; `starts` (each response's first index)
    is read by likelihood-gated RMs only. Or `{"pairs", "margin", "safe"}`: one row per pair, both sides' rewards
    read from it (`data.pair_rows`). Adds `safety_weight` × the auxiliary loss."""
    if "pairs" in batch:
        tokens = batch["pairs"]["tokens"]
        rewards = model(tokens, pairs=batch["pairs"])  # (2B,)
    else:
        tokens = batch["tokens"]
        rewards = model(tokens, batch["lengths"], batch["starts"])  # (2B,)
    chosen, rejected = rewards.chunk(2)
    loss, metrics = preference_loss(chosen, rejected, batch["margin"])
    if safety_weight > 0:
        aux = safety_auxiliary_loss(rewards, batch["safe"])
        loss = loss + safety_weight * aux
        metrics["safety_loss"] = aux.detach()
    return loss, {**metrics, "loss": loss.detach(), "tokens": float(tokens.numel())}
