"""The output layer and the next-token cross-entropy in one pass, a chunk of rows at a time, never holding all
the logits.

`F.cross_entropy(F.linear(h, W).float(), y)` keeps the fp32 logits and their log-softmax for backward: at
Llama 2's 32k vocabulary 0.5 GB for every 4,096 positions, and backward then walks them again through the
log-softmax's own pass. Here each chunk computes its logits, its share of the loss, and straight away its
gradients with respect to the hidden states and the weight (softmax minus the one-hot target, over the number
of rows), then drops its logits: the same three matmuls as forward and backward, no logits kept. Backward only
scales the stored gradients by the incoming one. Liger-Kernel's fused linear cross-entropy does the same on
GPUs, for the memory. On the 2-core CPU it is also faster: for the stories15M shape (2,048 positions, vocab
32,000) the head's forward and backward took 0.58-0.64 s instead of 0.70-0.72 s in fp32 and 0.35 s instead of
0.49-0.51 s under bf16 autocast; for the toy demo's (4,096 positions, vocab 2,048) 0.022 s instead of 0.044 s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama2.tokenizer.chat_format import IGNORE_INDEX

CHUNK_ROWS = 512
"""Rows per chunk: 512 x 32,000 fp32 logits are 65 MB. On the 2-core CPU 512 was as fast as any size tried for
both vocabularies above (256-1,024 at 32,000, 256-2,048 at 2,048); 64 was 1.7x slower at 32,000."""


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (fp32) against `targets`, skipping `ignore_index`:
    `F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)` for `hidden` (..., D),
    `weight` (V, D) and `targets` (...), without keeping the logits. NaN when every target is ignored, as there."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    counted = targets != ignore_index
    if not bool(counted.all()):
        hidden, targets = hidden[counted], targets[counted]
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _chunked(hidden, weight, targets, need_hidden=False, need_weight=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None)


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_hidden: bool,
             need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss/d hidden, d loss/d weight), the gradients only where asked for."""
    n = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, CHUNK_ROWS):
        h, y = hidden[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
        logits = F.linear(h, weight).float()  # (rows, V); under autocast the matmul runs in its dtype, as the head's
        picked = logits.gather(1, y[:, None]).squeeze(1)
        top = logits.amax(-1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: the chunk's logits are not needed again
        norm = probs.sum(-1, keepdim=True)
        total += (norm.log() + top).squeeze(1).sub_(picked).sum()
        if need_hidden or need_weight:
            grad = probs.div_(norm)
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            grad = grad.div_(n).to(weight.dtype)
            if need_hidden:
                grad_hidden[start : start + len(y)] = (grad @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad.T @ h.to(weight.dtype)).float()
    return total / n, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
