"""Compiled fine-tuning steps on packed dialog windows: tiled masked attention against the one dense call.

    python -m benchmarks.packed_attention_cpu

The demo model (toy-demo shape, fp32) trained the way SFT and GAtt train it: blocks compiled, dialogs packed
into windows that attend block-diagonally. Two models with the same weights, one attending through
`masked_attention` (the tiles, a custom operator that compiled code keeps) and one through
`F.scaled_dot_product_attention` with the whole mask (what compiled blocks ran before), fed the same
micro-batches alternately so that a CPU whose speed drifts by the minute slows both alike. Dialog lengths
are drawn like the demo's: SFT dialogs of 20-130 tokens (mean ~75) in 8 windows of 512; GAtt's 20-turn
dialogs of 700-1000 tokens in 4 windows of 1024 (the last dialog of a window cut at its end). The speedup is
the median over micro-batches of the dense time over the tiled one.

A third row times pretraining with `data.document_mask_steps` (each packed document attends only to itself, through
the tiles) against plain causal attention over the whole window (PyTorch's causal flash kernel), on windows of
documents of 20-120 tokens (the toy corpus's average 68).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import llama2.model.transformer as transformer
from benchmarks.common import machine, markdown_table
from llama2 import ModelArgs, Transformer
from llama2.model.masked_attention import masked_attention
from llama2.training.losses import causal_lm_loss, packed_chat_loss
from llama2.training.parallel import apply_compile

STEPS = 12


def _dense(q, k, v, mask, enable_gqa=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _windows(rows: int, width: int, lengths: tuple[int, int], generator: torch.Generator) -> dict:
    """Random tokens in `rows` windows of `width`, dialogs of lengths drawn from `lengths` (the last one cut at
    the window's end), labels on two thirds of the positions."""
    doc_ids = torch.zeros(rows, width, dtype=torch.long)
    for row in range(rows):
        start, doc = 0, 0
        while start < width:
            length = int(torch.randint(*lengths, (1,), generator=generator))
            doc_ids[row, start : start + length] = doc
            start, doc = start + length, doc + 1
    tokens = torch.randint(0, 2048, (rows, width), generator=generator)
    labels = tokens.roll(-1, dims=1)
    labels[:, ::3] = -100
    return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}


def _compare(name: str, rows: int, width: int, lengths: tuple[int, int]) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = [_windows(rows, width, lengths, generator) for _ in range(STEPS + 2)]
    return _time_pair(name, batches, {"tiles": (packed_chat_loss, masked_attention),
                                      "dense": (packed_chat_loss, _dense)})


def _compare_pretraining(name: str, rows: int, width: int, lengths: tuple[int, int]) -> list[dict]:
    """Pretraining's `data.document_mask_steps` against plain causal attention over the same windows: each
    document attending only to itself, through the tiles, against the causal flash kernel over the window
    (`causal_lm_loss` reads no `doc_ids`)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS + 2):
        batch = _windows(rows, width, lengths, generator)
        batch["labels"] = batch["tokens"].roll(-1, dims=1)  # every position trained
        batches.append(batch)
    return _time_pair(name, batches, {"documents": (packed_chat_loss, masked_attention),
                                      "causal": (causal_lm_loss, masked_attention)})


def _time_pair(name: str, batches: list[dict], impls: dict) -> list[dict]:
    """Two compiled models with the same weights, each trained by its own (loss, masked attention), fed the same
    micro-batches alternately; the rows of `_rows`, the first implementation's speedup over the second."""
    models = _compiled_models(impls)

    def step(impl: str, batch: dict) -> float:
        loss_fn, attention = impls[impl]
        transformer.masked_attention = attention  # read when the blocks compile and at each call
        start = time.perf_counter()
        loss, _ = loss_fn(models[impl], batch)
        loss.backward()
        return time.perf_counter() - start

    names = tuple(impls)
    try:
        times = _alternate(step, names, batches)
    finally:
        transformer.masked_attention = masked_attention
    return _rows(name, batches[0]["tokens"].numel(), times, names)


def _compiled_models(names) -> dict[str, Transformer]:
    """One demo-shaped model per name, the same weights, blocks compiled as the training engine does."""
    models = {}
    for name in names:
        model = Transformer(ModelArgs.from_preset("toy-demo"))
        model.init_weights(seed=0)
        apply_compile(model)
        models[name] = model.train()
    return models


def _rows(name: str, tokens: int, times: dict[str, list[float]], impls: tuple[str, str]) -> list[dict]:
    """Median tokens/s of each, and the speedup of the first: the median over micro-batches of the second's
    time over the first's."""
    ratio = statistics.median(b / a for a, b in zip(times[impls[0]], times[impls[1]], strict=True))
    return [{"benchmark": name, "impl": impl, "tokens/s": tokens / statistics.median(times[impl]),
             "speedup": ratio if impl == impls[0] else 1.0} for impl in impls]


def _alternate(step, impls: tuple[str, str], batches: list[dict]) -> dict[str, list[float]]:
    """Two warm-up micro-batches each (compiling), then every micro-batch through both, in alternating order."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for impl in impls:
        for batch in batches[:2]:
            step(impl, batch)
    for i, batch in enumerate(batches[2:]):
        for impl in (impls if i % 2 else impls[::-1]):
            times[impl].append(step(impl, batch))
    return times


def run() -> list[dict]:
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return (_compare("SFT micro-batch, 8 x 512, dialogs of 20-130 tokens", 8, 512, (20, 131))
            + _compare("GAtt micro-batch, 4 x 1024, dialogs of 700-1000 tokens", 4, 1024, (700, 1001))
            + _compare_pretraining("pretraining micro-batch, 4 x 1024, documents of 20-120 tokens: document mask "
                                   "vs causal", 4, 1024, (20, 121)))


if __name__ == "__main__":
    print(f"machine: {machine()}")
    print(markdown_table(run()))
