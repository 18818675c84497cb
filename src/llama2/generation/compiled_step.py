"""One decoding step compiled by `torch.compile` over static shapes: the CPU counterpart of the CUDA graph.

Batch-1 decoding of a small model on a CPU spends most of a step outside the matrix products: a hundred
small eager operators, each with its own dispatch and memory pass. Compiling the model's static-shape step (a
tensor `start_pos`, attention over the whole preallocated cache) fuses them into a few C++ loops. The compiled
step keeps its own KV cache (the compiled code is specialised to it) and re-attaches it to the model before
each use, as the CUDA-graph step does. Compiling takes tens of seconds per batch size and cache length, so it
is opt-in (`generate(..., compile=True)`, `Llama.load(..., compile=True)`) and pays off over many tokens.
"""

from __future__ import annotations

import torch

from llama2.model.transformer import Transformer

CACHE_LEN_MULTIPLE = 256
MAX_STEPS = 4


class CompiledDecodeStep:
    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        model.setup_cache(batch_size, cache_len)
        self.caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
        self.model = model
        self.pos = torch.zeros((), dtype=torch.long, device=model.output.weight.device)
        self.fn = torch.compile(lambda tokens, pos: model(tokens, start_pos=pos), dynamic=False)

    def attach(self) -> None:
        """Point the model's attention layers at this step's KV cache (prefill writes into it too)."""
        for layer, (k, v) in zip(self.model.layers, self.caches, strict=True):
            layer.attention.cache_k, layer.attention.cache_v = k, v

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B, 1) at position `pos`."""
        self.pos.fill_(pos)
        return self.fn(tokens, self.pos)


def compiled_step(model: Transformer, batch_size: int, cache_len: int) -> CompiledDecodeStep:
    """The model's compiled step for this batch size and cache length, compiled once and reused.

    The cache length is rounded up to a multiple of 256 so that prompts of similar length share a step, and
    only the 4 most recently used steps (each holding a KV cache) are kept.
    """
    cache_len = min(model.args.max_seq_len, -(-cache_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
    steps: dict[tuple, CompiledDecodeStep] = model.__dict__.setdefault("_compiled_steps", {})
    key = (batch_size, cache_len, tuple(p.data_ptr() for p in model.parameters()))
    step = steps.pop(key, None) or CompiledDecodeStep(model, batch_size, cache_len)
    steps[key] = step  # most recently used last
    while len(steps) > MAX_STEPS:
        steps.pop(next(iter(steps)))
    step.attach()
    return step
