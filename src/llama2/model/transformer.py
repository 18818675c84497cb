"""The Llama 2 decoder (SPEC §1.1), readable in one sitting.

Module and parameter names are Meta's checkpoint keys (`wq`, `w1`, `attention_norm`, ...). Rotary embeddings
use the half-split ("rotate_half") layout of Hugging Face checkpoints; Meta checkpoints have their q/k rows
permuted on load (`checkpoint.py`). `forward` returns logits only: losses live in `training/losses.py` and
parallelism is applied from outside (`training/parallel.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama2.model.args import ModelArgs
from llama2.model.linear_cross_entropy import linear_cross_entropy
from llama2.model.masked_attention import masked_attention


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, computed in fp32 and cast back, as in Meta's reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `(length, head_dim)` for the half-split rotary layout, frequencies 1/theta^(2i/hd)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, hd) by position; cos/sin are (T, hd), or (B, 1, T, hd) for per-row positions.
    Pairs are (x[i], x[i + hd/2]).

    The rotated copy (−x2, x1) is the halves swapped by a flip and the first one negated, not a concatenation:
    the same values, but a compiled decoding step fuses it into its neighbours, where a concatenation was
    written out by one thread while the other waited (four such serial copies a layer)."""
    swapped = x.view(*x.shape[:-1], 2, x.shape[-1] // 2).flip(-2)  # (x2, x1)
    first = torch.arange(2, device=x.device).view(2, 1) == 0
    rotated = torch.where(first, -swapped, swapped).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int | torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Without a cache queries and keys are the same positions, so causal is right at any length (one token
        # included); a test of `seqlen` here would be a SymBool, which SDPA refuses, once blocks compiled for
        # one length are called with another (dynamic shapes).
        is_causal = mask is None
        if isinstance(start_pos, torch.Tensor):
            # Static-shape decoding (CUDA-graph friendly): write at tensor positions, attend over the whole
            # cache with everything after the current position masked out.
            positions = start_pos + torch.arange(seqlen, device=x.device)  # (T,)
            self.cache_k[:bsz].index_copy_(2, positions, k)
            self.cache_v[:bsz].index_copy_(2, positions, v)
            k, v = self.cache_k[:bsz], self.cache_v[:bsz]  # (B, Hkv, S, hd)
            causal = torch.arange(k.shape[2], device=x.device) <= positions[:, None]  # (T, S)
            mask = causal if mask is None else mask & causal
            is_causal = False
        elif start_pos is not None:
            # Incremental decoding: write this chunk into the cache and attend over everything so far.
            end = start_pos + seqlen
            self.cache_k[:bsz, :, start_pos:end] = k
            self.cache_v[:bsz, :, start_pos:end] = v
            k, v = self.cache_k[:bsz, :, :end], self.cache_v[:bsz, :, :end]  # (B, Hkv, S, hd)
            if start_pos > 0 and seqlen > 1 and mask is None:
                # A chunk after a prefix: causal with the diagonal shifted by start_pos.
                mask = torch.ones(seqlen, end, dtype=torch.bool, device=x.device).tril(start_pos)
            is_causal = mask is None and seqlen > 1
        gqa = self.n_kv_heads != self.n_heads
        if start_pos is None and mask is not None:
            out = masked_attention(q, k, v, mask, enable_gqa=gqa)  # packed windows: skip masked-out keys
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        # out: (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`Transformer(args)(tokens)` → fp32 logits (B, T, vocab).

    `start_pos=None` is the training path (full causal attention, no cache). With an integer `start_pos`
    the tokens are positions `start_pos…start_pos+T-1` of sequences whose earlier keys/values are in the
    KV cache, which is allocated on first use for the batch size (see `setup_cache`). A 0-d tensor
    `start_pos` does the same with shapes that never change from step to step (attention over the whole
    preallocated cache, later positions masked), so one decoding step can be captured in a CUDA graph.
    `mask` is an optional boolean attention mask (B or 1, 1, T, S), True where attention is allowed, used
    for block-diagonal attention between packed documents and for the left padding of ragged prompts (with
    the static-shape path it is combined with the causal mask over the whole cache). `positions` (B, T)
    gives each row's own rotary positions, for left-padded rows whose first real token sits at a later
    cache slot; by default a token's position is its slot.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, 2 * args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """Initialisation for training from scratch (the paper gives none, SPEC §14).

        Every linear layer and the embedding ~ N(0, init_std); the two projections that write into the
        residual stream (`wo`, `w2`) are scaled down by 1/sqrt(2·n_layers) so the stream's variance does
        not grow with depth (GPT-2's rule). RMSNorm weights are ones.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.args.init_std
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, residual_std, generator=gen)
            else:
                nn.init.normal_(p, 0.0, std, generator=gen)
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recompute the rotary tables (needed after materialising a model built on the meta device)."""
        cos, sin = rope_tables(self.args.head_dim, 2 * self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos = cos.to(self.output.weight.device)
        self.rope_sin = sin.to(self.output.weight.device)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None):
        """Allocate the KV cache (B, Hkv, S, hd) per layer; generation calls this once per batch."""
        length = max_seq_len or self.args.max_seq_len
        weight = self.output.weight
        shape = (batch_size, self.args.n_kv_heads, length, self.args.head_dim)
        for layer in self.layers:
            attn = layer.attention
            attn.cache_k = torch.zeros(shape, dtype=dtype or weight.dtype, device=weight.device)
            attn.cache_v = torch.zeros(shape, dtype=dtype or weight.dtype, device=weight.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def hidden_states(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim): the trunk shared by the LM head and the scalar heads."""
        bsz, seqlen = tokens.shape
        if start_pos is not None and not isinstance(start_pos, torch.Tensor):
            cache = self.layers[0].attention.cache_k
            if cache is None or cache.shape[0] < bsz or cache.shape[2] < start_pos + seqlen:
                self.setup_cache(bsz, max(self.args.max_seq_len, start_pos + seqlen))
        if positions is not None:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B,1,T,hd)
        elif isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seqlen, device=tokens.device)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:
            offset = start_pos or 0
            if offset + seqlen > self.rope_cos.shape[0]:
                raise ValueError(f"sequence end {offset + seqlen} exceeds the rotary table ({self.rope_cos.shape[0]})")
            cos = self.rope_cos[offset : offset + seqlen]
            sin = self.rope_sin[offset : offset + seqlen]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits (B, T, vocab); with a boolean `keep` (B, T), only the kept positions' logits, (N, vocab)
        in row-major order. A chat loss is on the assistant tokens alone (about a seventh of a packed toy
        window; the output layer and an fp32 log-softmax over the vocabulary cost as much as a third of the
        blocks' work), and at Llama 2's 32k vocabulary the full fp32 logits of one 4096-token row are 0.5 GB.
        With `targets` ((B, T), or (N,) with `keep`; -100 where no loss) the mean next-token cross-entropy
        instead, computed chunk by chunk without the logits (`linear_cross_entropy`). It is computed here, not
        by the caller from the logits, so that under FSDP it runs while the output weight is gathered."""
        h = self.hidden_states(tokens, start_pos, mask, positions)
        if keep is not None:
            h = h[keep]
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets)
        return self.output(h).float()
