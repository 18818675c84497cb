"""Decoding steps that own a KV cache (CUDA graphs, compiled steps), built once per shape and kept per model.

A captured graph or a compiled step is specialised to the KV cache it was built with, so each step owns its
cache and re-attaches it to the model before use (prefill then writes into it too). Steps are keyed by batch
size, cache length (rounded up to a multiple of 256 so that prompts of similar length share a step) and the
weights' storage (a cast, a move or a reload needs a new step); only the 4 most recently used are kept,
since each holds a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from llama2.model.transformer import Transformer

CACHE_LEN_MULTIPLE = 256
MAX_STEPS = 4


class CacheOwningStep:
    """Allocates the model's KV cache for this step's shape and keeps it as the step's own."""

    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        model.setup_cache(batch_size, cache_len)
        self.cache_len = cache_len
        self.caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
        self.model = model

    def attach(self) -> None:
        """Point the model's attention layers at this step's KV cache."""
        for layer, (k, v) in zip(self.model.layers, self.caches, strict=True):
            layer.attention.cache_k, layer.attention.cache_v = k, v


S = TypeVar("S", bound=CacheOwningStep)


def cached_step(model: Transformer, batch_size: int, cache_len: int, build: Callable[[Transformer, int, int], S]) -> S:
    """The model's step of type `build` for this shape, built once and reused, attached to the model."""
    # A left-padded grid of ragged prompts can outgrow the context (see `generator`), never the rotary tables.
    cache_len = min(2 * model.args.max_seq_len, -(-cache_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
    steps: dict[tuple, S] = model.__dict__.setdefault("_decode_steps", {})
    key = (build, batch_size, cache_len, tuple(p.data_ptr() for p in model.parameters()))
    step = steps.pop(key, None) or build(model, batch_size, cache_len)
    steps[key] = step  # most recently used last
    while len(steps) > MAX_STEPS:
        steps.pop(next(iter(steps)))
    step.attach()
    return step
