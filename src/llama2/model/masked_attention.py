"""Attention under a sparse boolean mask, computed only where the mask allows it.

Packed SFT and GAtt windows attend block-diagonally: a 1024-token window holds about 14 toy dialogs of
~74 tokens, so most of its T×T mask is False. PyTorch's CPU flash kernel skips nothing when it is given a
mask (it is ~1.6× slower than `is_causal` over the whole window), so each query tile here attends only to
the span of keys its rows allow. The result is the same attention, tile by tile; on the demo model a
packed SFT step took 0.77 s instead of 0.97 s (medians of 8, interleaved; 2-core AMD EPYC, bf16 autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_TILE = 128
"""Queries per tile: 64, 128 and 256 measured within 7% of each other; 128 was the fastest."""


def key_spans(mask: torch.Tensor, tile: int = QUERY_TILE) -> list[tuple[int, int, int, int]]:
    """(query start, query end, key start, key end) per tile of `mask` (..., T, S): the narrowest key range
    holding every allowed key of the tile's rows, over all batch rows and heads. A tile with no allowed key
    keeps the whole range, so fully masked rows come out as the dense call would give them."""
    seqlen, keys = mask.shape[-2:]
    spans = []
    for start in range(0, seqlen, tile):
        end = min(seqlen, start + tile)
        used = mask[..., start:end, :].any(dim=-2).reshape(-1, keys).any(dim=0).nonzero()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, keys)
        spans.append((start, end, lo, hi))
    return spans


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, enable_gqa: bool = False
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` for a boolean `mask` (B or 1, 1, T, S),
    tile by tile over the keys each tile may see. Short sequences, traced code and GPUs (where the tiles'
    host syncs are untested against the fused kernels) take the single call."""
    single = q.device.type != "cpu" or mask.dtype != torch.bool or torch.compiler.is_compiling()
    if single or q.shape[2] <= QUERY_TILE:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask[..., start:end, lo:hi],
            enable_gqa=enable_gqa,
        )
        for start, end, lo, hi in key_spans(mask)
    ]
    return torch.cat(outs, dim=2)
