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
        self.positions = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.mask = torch.ones((batch_size, 1, 1, self.cache_len), dtype=torch.bool, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        return self.model(self.tokens, start_pos=self.pos, mask=self.mask, positions=self.positions)

    def __call__(self, tokens: torch.Tensor, pos: int, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B, 1) written at cache slot `pos`, at rotary `positions` (B, 1),
        attending to the slots where `mask` (B, 1, 1, cache_len) is True; the returned tensor is reused."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.positions.copy_(positions)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


def graphed_step(model: Transformer, batch_size: int, cache_len: int) -> GraphedDecodeStep:
    """The model's captured step for this batch size and cache length, captured once and reused (see
    `step_cache`). In-place weight updates (an optimizer step) are seen by the graph."""
    return cached_step(model, batch_size, cache_len, GraphedDecodeStep)
