"""One decoding step captured as a CUDA graph, so a token costs one graph launch instead of hundreds of kernels.

Batch-1 decoding of a small or medium model on a GPU is bound by kernel launches, not by the GPU: replaying a
captured graph removes the Python and launch overhead. The step uses the model's static-shape path (a tensor
`start_pos`), and the KV cache it writes is the graph's own, kept alive between calls and re-attached to the
model before each use.
"""

from __future__ import annotations

import torch

from llama2.generation.step_cache import CacheOwningStep, cached_step
from llama2.model.transformer import Transformer


class GraphedDecodeStep(CacheOwningStep):
    def __init__(self, model: Transformer, batch_size: int, cache_len: int):
        super().__init__(model, batch_size, cache_len)
        device = model.output.weight.device
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                model(self.tokens, start_pos=self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, start_pos=self.pos)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B, 1) at position `pos`; the returned tensor is reused next call."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def graphed_step(model: Transformer, batch_size: int, cache_len: int) -> GraphedDecodeStep:
    """The model's captured step for this batch size and cache length, captured once and reused (see
    `step_cache`). In-place weight updates (an optimizer step) are seen by the graph."""
    return cached_step(model, batch_size, cache_len, GraphedDecodeStep)
