"""One forward pass over rows that sit at *different* positions: the step continuous batching needs.

`Transformer.forward(tokens, start_pos)` decodes a batch whose rows all share one position, which suits a
batch started together (`generation/generator.py`). A server admits new requests between decode steps, so
its rows are at different positions. This module runs the same blocks (the model's own modules, norms,
`apply_rope` and rotary tables) with a per-row position and a per-row slot in a KV cache the server owns.
`tests/serving/test_batched_forward.py` checks it against `Transformer.forward` so the two cannot drift.

The change that would make this module unnecessary: let `Transformer.forward` take `start_pos` as a (B,)
tensor plus a cache row offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama2.model.transformer import Transformer, apply_rope


@dataclass
class SlotCache:
    """Keys and values per layer, (rows, Hkv, max_seq_len, hd); row r holds the r-th running sequence."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: Transformer, rows: int) -> SlotCache:
        args, weight = model.args, model.output.weight
        shape = (rows, args.n_kv_heads, args.max_seq_len, args.head_dim)
        make = lambda: torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # noqa: E731
        return cls([make() for _ in model.layers], [make() for _ in model.layers])

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (keeps running rows contiguous)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]


@torch.inference_mode()
def forward_rows(
    model: Transformer,
    cache: SlotCache,
    first_row: int,
    tokens: torch.Tensor,
    start: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, vocab) at index `last[b]` of each row, feeding `tokens` (B, T) at positions start[b]+t.

    The rows live in cache rows `first_row … first_row+B-1`. Rows shorter than T are padded on the right: the
    padding writes keys past the row's end, which no query reads before a real token overwrites them.
    """
    bsz, seqlen = tokens.shape
    args = model.args
    device = tokens.device
    pos = start[:, None] + torch.arange(seqlen, device=device)  # (B, T)
    span = int(pos.max()) + 1
    if span > args.max_seq_len:
        raise ValueError(f"position {span - 1} is past the model's context ({args.max_seq_len})")
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, T, hd)
    allowed = torch.arange(span, device=device) <= pos[:, :, None]  # (B, T, S): causal per row
    mask = allowed[:, None]  # (B, 1, T, S)
    rows = torch.arange(bsz, device=device)[:, None]  # (B, 1) indexes the cache rows of this batch

    h = model.tok_embeddings(tokens)  # (B, T, dim)
    for layer, k_cache, v_cache in zip(model.layers, cache.keys, cache.values, strict=True):
        attn = layer.attention
        x = layer.attention_norm(h)
        q = attn.wq(x).view(bsz, seqlen, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = attn.wk(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = attn.wv(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_rows = k_cache[first_row : first_row + bsz]  # (B, Hkv, S_max, hd), a view
        v_rows = v_cache[first_row : first_row + bsz]
        k_rows[rows, :, pos] = k.transpose(1, 2)  # indexed (B, T, Hkv, hd)
        v_rows[rows, :, pos] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k_rows[:, :, :span], v_rows[:, :, :span], attn_mask=mask, enable_gqa=attn.n_kv_heads != attn.n_heads
        )  # (B, H, T, hd)
        h = h + attn.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    h_last = h[torch.arange(bsz, device=device), last]  # (B, dim): only the positions we sample from
    return model.output(model.norm(h_last)).float()
