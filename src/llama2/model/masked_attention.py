"""Attention under a sparse boolean mask, computed only where the mask allows it, compiled or not.

Packed SFT and GAtt windows attend block-diagonally: a 512-token demo SFT window holds about 7 dialogs of
~74 tokens, so most of its T×T mask is False. PyTorch's CPU flash kernel skips nothing when it is given a
mask: it computes every score of the window. Here each tile of 128 queries attends only to the span of keys
that its queries may see in any row of the batch (from the start of the earliest dialog in the tile), through
the same flash kernel, forward and backward, so the result is that attention tile by tile.

It is a custom operator (`llama2::tiled_attention`, with its backward as another) so that `torch.compile`
keeps it whole: the compiled training blocks of SFT, GAtt and the later fine-tunes used to take the single
dense call, since the tiles' spans are read from the mask on the host. Measured on the 2-core AMD EPYC with
AVX2 only, demo model, fp32, the same micro-batches alternated in one process (16-28 of them): one layer's
attention forward and backward over 8 windows × 512 tokens took 73 ms dense and 32 ms in tiles; a compiled SFT
micro-batch (8 × 512 tokens of demo dialogs) 1.13-1.19 s against 0.98-1.07 s (median ratio 1.11-1.17), and a
compiled GAtt one (4 × 1024, one 20-turn dialog a window) 1.79 s against 1.42 s (1.25); on synthetic windows
`python -m benchmarks.packed_attention_cpu` reads 1.15-1.28 and 1.18-1.24 (three runs). Eager calls (the
reward models' pair rows) run 1.7-4.4% slower than the list of SDPA calls this replaced (three runs of 30
steps), which the operator's own bookkeeping costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llama2.machine import amx

QUERY_TILE = 128
"""Queries per tile: 64 and 128 measured within 5% of each other."""

FAST_BF16_ATTENTION = amx()
"""Whether the CPU's masked flash kernels run bf16 at least as fast as fp32. Without AMX they do not: on a 2-core
AMD EPYC with AVX-512 and native bf16 (Zen 4), a compiled SFT micro-batch's (8 × 512, bf16 autocast) attention
backward took 213 ms in bf16 against 84 in fp32, while its matrix products ran 2.2× faster in bf16. The tiles
in fp32 made the whole micro-batch 1.31× faster there (0.602 → 0.461 s) and a GAtt one (4 × 1024) 1.15-1.21×, with
gradients as close to fp32 training's as before. Pretraining's causal call (no mask) stays in bf16, which
ran 9% faster there."""


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the flash kernels run in for `dtype` inputs: fp32 for bf16 where bf16 is the slower one."""
    return torch.float32 if dtype == torch.bfloat16 and not FAST_BF16_ATTENTION else dtype

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def key_spans(mask: torch.Tensor, tile: int = QUERY_TILE) -> list[tuple[int, int, int, int]]:
    """(query start, query end, key start, key end) per tile of `tile` queries of `mask` (..., T, S): the
    narrowest key range holding every allowed key of the tile's queries, over all batch rows and heads. A tile
    with no allowed key keeps the whole range, so fully masked queries come out as the dense call gives them.
    One span for the whole batch: with a span per row the kernel calls multiplied and their overhead ate the
    gain (43 ms against 32 for a layer's forward and backward, same demo windows)."""
    seqlen, keys = mask.shape[-2:]
    tiles = math.ceil(seqlen / tile)
    padded = F.pad(mask.reshape(-1, seqlen, keys).any(dim=0), (0, 0, 0, tiles * tile - seqlen))
    allowed = padded.view(tiles, tile, keys).any(dim=1)  # (tiles, S)
    found = allowed.any(dim=-1)
    lo = torch.where(found, allowed.int().argmax(dim=-1), 0)
    hi = torch.where(found, keys - allowed.flip(-1).int().argmax(dim=-1), keys)
    return [(t * tile, min(seqlen, (t + 1) * tile), a, b)
            for t, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True))]


def _tiles(mask: torch.Tensor, spans: list[list[int]], dtype: torch.dtype):
    """Each span's (queries, keys, additive mask in `dtype`) for a boolean mask (B or 1, 1, T, S)."""
    zero, minus_inf = torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype)
    for start, end, lo, hi in spans:
        yield slice(start, end), slice(lo, hi), torch.where(mask[..., start:end, lo:hi], zero, minus_inf)


# A change to either operator's arguments needs a new operator name: Inductor's on-disk graph cache keys a
# compiled graph by the graph, not by the schemas of the custom operators it calls, and a stale entry calls
# the old signature.
@torch.library.custom_op("llama2::tiled_attention", mutates_args=(), device_types="cpu")
def _tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention, its log-sum-exp per query, and the tiles' spans (`key_spans`, (tiles, 4)), which the
    backward reuses."""
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)
    spans = key_spans(mask)
    for queries, span, bias in _tiles(mask, spans, q.dtype):
        out[:, :, queries], lse[:, :, queries] = _flash(
            q[:, :, queries], k[:, :, span], v[:, :, span], attn_mask=bias, scale=scale)
    return out, lse, torch.tensor(spans, dtype=torch.long)


@_tiled_attention.register_fake
def _(q, k, v, mask, scale):
    tiles = math.ceil(q.shape[2] / QUERY_TILE)
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty((tiles, 4), dtype=torch.long))


@torch.library.custom_op("llama2::tiled_attention_backward", mutates_args=(), device_types="cpu")
def _tiled_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor, spans: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.zeros(k.shape, dtype=torch.float32)  # a key in several tiles' spans sums their gradients
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for queries, span, bias in _tiles(mask, spans.tolist(), q.dtype):
        gq, gk, gv = _flash_backward(
            grad[:, :, queries].contiguous(), q[:, :, queries], k[:, :, span], v[:, :, span],
            out[:, :, queries], lse[:, :, queries], 0.0, False, attn_mask=bias, scale=scale)
        dq[:, :, queries] = gq
        dk[:, :, span] += gk
        dv[:, :, span] += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@_tiled_attention_backward.register_fake
def _(grad, q, k, v, out, lse, mask, spans, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, mask, *output)


def _backward(ctx, grad_out, _grad_lse, _grad_spans):
    q, k, v, mask, out, lse, spans = ctx.saved_tensors
    return (*_tiled_attention_backward(grad_out, q, k, v, out, lse, mask, spans, ctx.scale), None, None)


_tiled_attention.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, enable_gqa: bool = False
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` for a boolean `mask` (B or 1, 1, T, S),
    tile by tile over the keys each tile may see. GPUs, other masks and sequences of one tile take the
    single call."""
    single = q.device.type != "cpu" or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
    if single or q.shape[2] <= QUERY_TILE:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        if not enable_gqa:
            raise ValueError(f"{heads} query heads over {kv_heads} key-value heads needs enable_gqa=True")
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    dtype = kernel_dtype(q.dtype)  # the result comes back in q's dtype; autograd casts the gradients alike
    out = _tiled_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, q.shape[-1] ** -0.5)[0]
    return out.to(q.dtype)
