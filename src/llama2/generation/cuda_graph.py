"""One decoding step captured as a CUDA graph, so a token costs one graph launch instead of hundreds of kernels.

Batch-1 decoding of a small or medium model on a GPU is bound by kernel launches, not by the GPU: replaying a
captured graph removes the Python and launch overhead. The step uses the model's static-shape path (a tensor
`start_pos`), and the KV cache it writes is the graph's own, kept alive between calls and re-attached to the
model before each use.
"""

from __future__ import annotations

import torch

from llama2.model.transformer import Transformer


class GraphedDecodeStep:
    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        device = model.output.weight.device
        model.setup_cache(batch_size, cache_len)
        self.caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.model = model
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                model(self.tokens, start_pos=self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, start_pos=self.pos)

    def attach(self) -> None:
        """Point the model's attention layers at this graph's KV cache (prefill writes into it too)."""
        for layer, (k, v) in zip(self.model.layers, self.caches, strict=True):
            layer.attention.cache_k, layer.attention.cache_v = k, v

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B, 1) at position `pos`; the returned tensor is reused next call."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


CACHE_LEN_MULTIPLE = 256
MAX_GRAPHS = 4


def graphed_step(model: Transformer, batch_size: int, cache_len: int) -> GraphedDecodeStep:
    """The model's captured step for this batch size and cache length, captured once and reused.

    The cache length is rounded up to a multiple of 256 so that prompts of similar length share a graph, and
    only the 4 most recently used graphs (each holding a KV cache) are kept. In-place weight updates (an
    optimizer step) are seen by the graph; weights moved to new storage get a new graph.
    """
    cache_len = min(model.args.max_seq_len, -(-cache_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
    steps: dict[tuple, GraphedDecodeStep] = model.__dict__.setdefault("_graphed_steps", {})
    # The graph holds raw pointers to the weights: a cast, a move or a reload (new storage) needs a new graph.
    key = (batch_size, cache_len, tuple(p.data_ptr() for p in model.parameters()))
    step = steps.pop(key, None) or GraphedDecodeStep(model, batch_size, cache_len)
    steps[key] = step  # most recently used last
    while len(steps) > MAX_GRAPHS:
        steps.pop(next(iter(steps)))
    step.attach()
    return step
