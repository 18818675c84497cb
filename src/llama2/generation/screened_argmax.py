"""The greedy token of one hidden state without reading the whole fp32 output matrix, and provably the same.

Batch-1 decoding on a CPU is bound by reading the weights, and at a 32k vocabulary the output matrix is most of
them (37 of the 61 MB of llama2.c's stories15M shape). Greedy decoding needs only the largest logit, so the
logits are first estimated from an fp16 copy of the matrix (half the bytes: 1.2 ms against 2.6 ms as a
compiled reduction on the 2-core AVX2 EPYC), each with a bound on its error; only the rows whose bound reaches
the top are recomputed from the fp32 weights. A row's error is at most ||w - fp16(w)|| * ||h|| (Cauchy-Schwarz;
the norm of each row's rounding is measured once, so fp16's subnormals are covered) plus the float rounding
of the two sums, at most 2 * dim * 2^-24 * ||w|| * ||h||. When the highest upper bound outside the candidates is
below the best candidate's exact logit, no other row can win; otherwise the caller falls back to the full logits.
"""

from __future__ import annotations

import torch

CANDIDATES = 16
"""Rows recomputed in fp32: those with the highest upper bounds."""

_FP16_MAX = 65504.0


class ScreenedOutput:
    """An fp16 copy of an fp32 output matrix and each row's error bound per unit of ||h||, refreshed when the
    matrix changes in place (an optimizer step bumps its version counter)."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.float32:
            raise ValueError(f"screening is for fp32 output weights, got {weight.dtype}")
        self.weight = weight
        self.version = -1
        self.refresh()

    def refresh(self) -> None:
        w = self.weight.detach()
        if w._version == self.version:
            return
        self.half = w.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # a weight beyond fp16's range: a large error
        rounding = 2 * w.shape[1] * 2.0**-24 * w.norm(dim=-1)
        self.err = ((w - self.half.float()).norm(dim=-1) + rounding) * (1 + 1e-3)  # slack for the norms' rounding
        self.version = w._version


def screened_argmax(h: torch.Tensor, weight: torch.Tensor, half: torch.Tensor, err: torch.Tensor,
                    k: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """For one hidden state h (dim,): the id (1,) of the largest of `weight @ h` among the k rows with the highest
    upper bounds (ties to the lowest id, as `argmax`), and whether it is provably the largest of all rows (1,)."""
    h = h.float()
    upper = (h * half.float()).sum(-1) + err * h.norm()
    bounds, ids = upper.topk(k + 1)
    ids = ids[:k].sort().values
    exact = (weight[ids] * h).sum(-1)
    best = exact.argmax().view(1)
    return ids.gather(0, best), bounds[k:] < exact.gather(0, best)
