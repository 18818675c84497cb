"""The greedy token of one hidden state without reading the whole fp32 output matrix, and provably the same.

Batch-1 decoding on a CPU is bound by reading the weights, and at a 32k vocabulary the output matrix is most of
them (37 of the 61 MB of llama2.c's stories15M shape). Greedy decoding needs only the largest logit, so the
logits are first estimated from an int8 copy of the matrix (a quarter of the bytes), each with a bound on its
error, and only the rows whose bound reaches the top are recomputed from the fp32 weights.

Each row w is stored as q * s, with q = round(w / s) in [-127, 127] and s = max|w| / 127, and its estimate is
s * sum(q * h) in fp32. Its distance from the fp32 logit w . h is at most
    ||w - q s|| ||h||                      (Cauchy-Schwarz; the norm of each row's rounding is measured once)
  + (dim + 8) * 2^-24 * ||q s|| ||h||      (the float rounding of the estimate's products and sum, whatever
                                           its order, and of the bound's own addition)
  + (dim + 8) * 2^-24 * ||w|| ||h||        (the same for the fp32 logit it is compared with)
with 0.1% slack for the rounding of the norms (dim counts the zero columns padded to a multiple of 32).

The rows are cut into blocks of `BLOCK`; the `BLOCKS` blocks with the highest upper bounds are recomputed in
fp32 and their best row is returned, lowest id first among equals. No other row can beat it when the next
block's highest upper bound is below that row's logit; otherwise the caller falls back to the full logits.
Choosing blocks needs a top-k of 16 of 500 block maxima instead of 17 of 32,000 logits (0.2 ms a step). A
non-finite weight or hidden state makes the bounds NaN: never proven.

The int8 codes are packed four to a 32-bit word (code k of word j is column j + k * dim / 4) and handed to the
compiled step as float32 words, reinterpreted as int32 inside it: the compiler's int32 and int8 loads go
through a stack copy on AVX2 that stalls each load, while its float loads do not. Compiled on the 2-core AVX2
EPYC, the screen takes 0.63-0.84 ms against 1.3-1.5 ms for an fp16 copy read the same way.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

BLOCK = 64
"""Rows per block of the screen."""
BLOCKS = 16
"""Blocks recomputed in fp32 (1,024 rows): those with the highest upper bounds."""
_ROUNDING = 2.0**-24


def screenable(weight: torch.Tensor) -> bool:
    """Whether an output matrix can be screened: fp32, and more than one block of rows (with fewer, nothing
    is left unread)."""
    return weight.dtype == torch.float32 and weight.shape[0] > BLOCK


class ScreenedOutput:
    """The packed int8 copy of an fp32 output matrix (V, dim), its row scales and each row's error bound per
    unit of ||h||, refreshed when the matrix changes in place (an optimizer step bumps its version counter)."""

    def __init__(self, weight: torch.Tensor):
        if not screenable(weight):
            raise ValueError(f"screening is for fp32 output weights of more than {BLOCK} rows, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        if sys.byteorder != "little":
            raise RuntimeError("the packed int8 screen assumes a little-endian machine")
        self.weight = weight
        self.version = -1
        self.refresh()

    def refresh(self) -> None:
        w = self.weight.detach()
        if w._version == self.version:
            return
        vocab, dim = w.shape
        padded = -(-dim // 32) * 32  # a word per 4 columns, 8 words per vector
        amax = w.abs().amax(-1)
        scale = torch.where(amax > 0, amax / 127, 1.0)
        q = (w / scale[:, None]).round().clamp(-127, 127)
        approx = q * scale[:, None]
        codes = F.pad(q.to(torch.int8), (0, padded - dim))
        words = codes.view(vocab, 4, padded // 4).transpose(1, 2).contiguous()
        self.packed = words.view(torch.float32).view(vocab, padded // 4)
        self.scale = scale
        sums = (padded + 8) * _ROUNDING * (approx.norm(dim=-1) + w.norm(dim=-1))
        self.slack = ((w - approx).norm(dim=-1) + sums) * (1 + 1e-3)
        self.version = w._version


def int8_logits(h: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The estimated logits (V,) of h (dim,) from the packed codes (see the module docstring)."""
    words = packed.view(torch.int32)
    quarter = words.shape[1]
    parts = F.pad(h, (0, 4 * quarter - h.shape[0])).view(4, quarter)
    acc = (words >> 24).float() * parts[3]
    for k in range(3):
        acc = acc + ((words << (24 - 8 * k)) >> 24).float() * parts[k]  # sign-extend byte k
    return acc.sum(-1) * scale


def screened_argmax(h: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                    slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one hidden state h (dim,): the id (1,) of the largest of `weight @ h` among the rows of the blocks
    with the highest upper bounds (ties to the lowest id, as `argmax`), and whether it is provably the largest
    of all rows (1,)."""
    h = h.float()
    vocab = weight.shape[0]
    upper = int8_logits(h, packed, scale) + slack * h.norm()
    blocks = F.pad(upper, (0, -vocab % BLOCK), value=-math.inf).view(-1, BLOCK)
    chosen = min(BLOCKS, blocks.shape[0] - 1)
    tops, ids = blocks.amax(-1).topk(chosen + 1)
    rows = (ids[:chosen, None] * BLOCK + torch.arange(BLOCK, device=h.device)).view(-1)
    rows = rows.clamp(max=vocab - 1)  # the last block's padding repeats the last row
    exact = (weight[rows] * h).sum(-1)
    best = exact.max()
    token = torch.where(exact == best, rows, vocab).amin()  # the lowest id among equals, without a sort
    return token.view(1), tops[chosen:] < best
