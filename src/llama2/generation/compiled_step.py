"""One decoding step compiled by `torch.compile` over static shapes: the CPU counterpart of the CUDA graph.

Batch-1 decoding of a small model on a CPU spends most of a step outside the matrix products: a hundred
small eager operators, each with its own dispatch and memory pass. Compiling the model's static-shape step (a
tensor `start_pos`, attention over the whole preallocated cache) fuses them into a few C++ loops. The compiled
step keeps its own KV cache (the compiled code is specialised to it) and re-attaches it to the model before
each use, as the CUDA-graph step does. Compiling takes tens of seconds per batch size and cache length, so it
is opt-in (`generate(..., compile=True)`, `Llama.load(..., compile=True)`) and pays off over many tokens.

With one sequence, every linear layer is written as a multiply-and-sum over its input dimension
(`OneRowOps`), which the compiler turns into reductions that stream the weights at memory speed, fused with
their neighbours. As matrix products they go to the BLAS, which on a 2-core AMD EPYC (MKL 2024.2) read the 37
MB stories15M output matrix at 7.5 GB/s (4.9 ms) against 38.7 GB/s (0.95 ms) as a reduction, and spent 65 µs
on each of a layer's small products inside the compiled step. Batch-1 decoding went from 90-111 to 203
tokens/s with the output projection alone as a reduction, and to 420 with every linear layer. With more rows
a matrix product reads the weights once for all of them, so it stays. Attention of the one query is written
the same way (scores, softmax and weighted sum as reductions over the cache): PyTorch's CPU flash kernel took
88 µs a layer for one query over a 256-slot cache, about a seventh of a stories15M step.

Greedy decoding of one sequence without log-probabilities needs only the next token, not the logits: that
step (`CompiledGreedyStep`) finds it with `screened_argmax`, which reads the output matrix in int8 and a few
of its rows in fp32, and returns the same token.
"""

from __future__ import annotations

import itertools
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llama2.generation.screened_argmax import ScreenedOutput, screened_argmax
from llama2.generation.step_cache import CacheOwningStep, cached_step
from llama2.model.transformer import Transformer

_STEP_IDS = itertools.count()


class CompiledDecodeStep(CacheOwningStep):
    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        super().__init__(model, batch_size, cache_len)
        self.pos = torch.zeros((), dtype=torch.long, device=model.output.weight.device)
        forward = _one_row_forward(model) if batch_size == 1 else model

        def step(tokens, pos, positions, mask):
            return forward(tokens, pos, mask, positions)

        self.fn = _compile_own(step)

    def __call__(self, tokens: torch.Tensor, pos: int, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B, 1) written at cache slot `pos`, at rotary `positions` (B, 1),
        attending to the slots where `mask` (B, 1, 1, cache_len) is True."""
        self.pos.fill_(pos)
        return self.fn(tokens, self.pos, positions, mask)


class CompiledGreedyStep(CacheOwningStep):
    """Batch-1 greedy decoding: the compiled step returns the next token, found by `screened_argmax` from an
    int8 copy of the output matrix and 1,024 of its fp32 rows, instead of the logits (the same token; where the
    screen cannot prove it, the full fp32 logits decide). A quarter of the output matrix's bytes are read per
    token. The output matrix must be `screenable`."""

    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        if batch_size != 1:
            raise ValueError(f"the greedy step decodes one sequence, got a batch of {batch_size}")
        screen = ScreenedOutput(model.output.weight)  # refuses a matrix it cannot screen, before any cache
        super().__init__(model, batch_size, cache_len)
        self.pos = torch.zeros((), dtype=torch.long, device=model.output.weight.device)
        self.screen = screen
        self.fallbacks = 0  # steps where the screen proved nothing and the full logits decided
        weight = model.output.weight

        def step(tokens, pos, positions, mask, packed, scale, slack):
            with OneRowOps():
                h = model.hidden_states(tokens, pos, mask, positions).view(-1)
            token, proven = screened_argmax(h, weight, packed, scale, slack)
            return token, proven, h

        self.fn = _compile_own(step)

    def __call__(self, tokens: torch.Tensor, pos: int, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The greedy next token (1,) for `tokens` (1, 1) written at cache slot `pos` (arguments as
        `CompiledDecodeStep`)."""
        screen = self.screen
        screen.refresh()
        self.pos.fill_(pos)
        token, proven, h = self.fn(tokens, self.pos, positions, mask, screen.packed, screen.scale, screen.slack)
        if bool(proven):
            return token
        self.fallbacks += 1
        return self.model.output(h.view(1, 1, -1)).argmax().view(1)


def _compile_own(step):
    """`torch.compile` of `step` as a code object of its own. TorchDynamo keeps compiled code per code object,
    at most `recompile_limit` (8) entries, so with one shared function the ninth step shape would fail. Its
    guards skip the model's ~70 parameters and buffers (0.29 ms of a 3 ms stories15M step); the weights are
    still read at each call, so in-place updates are seen, and a moved or cast model gets a new step (see
    `step_cache`). Tests check both."""
    own = types.FunctionType(step.__code__.replace(co_name=f"decode_step_{next(_STEP_IDS)}"),
                             step.__globals__, closure=step.__closure__)
    return torch.compile(own, dynamic=False, fullgraph=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


class OneRowOps(TorchFunctionMode):
    """`F.linear` on one row and attention of one query as multiply-and-sums in fp32 (any other call, and
    either of these on more rows, passes through unchanged)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() == args[0].shape[-1]:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
            return out if bias is None else out + bias
        if func is F.scaled_dot_product_attention and _one_query(args, kwargs):
            return one_query_attention(*args, **{k: v for k, v in kwargs.items() if k not in _OFF_FLAGS})
        return func(*args, **kwargs)


_OFF_FLAGS = ("is_causal", "dropout_p")  # SDPA flags `one_query_attention` handles only when they are off


def _one_query(args: tuple, kwargs: dict) -> bool:
    """One query, all of q, k, v given by position, a boolean mask or none, no causal flag, no dropout."""
    mask = kwargs.get("attn_mask")
    return (len(args) == 3 and args[0].shape[-2] == 1 and not any(kwargs.get(k) for k in _OFF_FLAGS)
            and (mask is None or mask.dtype == torch.bool))


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for q (B, H, 1, hd) over k, v (B, Hkv, S, hd) with a boolean mask
    broadcastable to (B, H, 1, S), in fp32; each group of H / Hkv query heads reads its key-value head once."""
    b, h, _, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hkv != h and not enable_gqa:
        raise ValueError(f"{h} query heads over {hkv} key-value heads needs enable_gqa=True")
    scale = hd**-0.5 if scale is None else scale
    qg = q.float().view(b, hkv, h // hkv, 1, hd)
    scores = (qg * k.float().unsqueeze(2)).sum(-1) * scale  # (B, Hkv, rep, S)
    if attn_mask is not None:
        scores = scores.view(b, h, 1, s).masked_fill(~attn_mask, float("-inf")).view(b, hkv, h // hkv, s)
    weights = scores.softmax(-1)
    out = (weights.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (B, Hkv, rep, hd)
    return out.view(b, h, 1, hd).to(q.dtype)


def _one_row_forward(model: Transformer):
    """The model's forward with its linear layers and attention as reductions (see `OneRowOps`)."""

    def forward(tokens, pos, mask, positions) -> torch.Tensor:
        with OneRowOps():
            return model(tokens, pos, mask, positions)

    return forward


def compiled_step(model: Transformer, batch_size: int, cache_len: int) -> CompiledDecodeStep:
    """The model's compiled step for this batch size and cache length, compiled once and reused
    (see `step_cache`)."""
    return cached_step(model, batch_size, cache_len, CompiledDecodeStep)


def compiled_greedy_step(model: Transformer, cache_len: int) -> CompiledGreedyStep:
    """The model's compiled batch-1 greedy step for this cache length (see `step_cache`)."""
    return cached_step(model, 1, cache_len, CompiledGreedyStep)
