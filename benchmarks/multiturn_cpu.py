"""Sampling many long dialogs turn by turn, as Ghost Attention does, fp32 CPU.

    python -m benchmarks.multiturn_cpu

24 dialogs of 16 turns on the demo's model shape (toy-demo, 1024-token context, random weights), 4 samples
of 40 tokens per turn, greedy so that both ways must give the same tokens: every turn's whole history
prefilled again (what `generate` did), against a `PrefixCache` that prefills each turn's new tokens only.
And one top-p draw for GAtt's batch of 352 rows over a 2048-token vocabulary: Meta's sort of the whole
vocabulary and `torch.multinomial`, against `sample_top_p`.
"""

from __future__ import annotations

import random
import time

import torch

from benchmarks.common import best_time, machine, markdown_table
from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate
from llama2.generation.prefix_cache import PrefixCache
from llama2.generation.sampling import sample_top_p

DIALOGS, TURNS, SAMPLES, REPLY = 24, 16, 4, 40


def _dialog_rows() -> list[dict]:
    model = Transformer(ModelArgs.from_preset("toy-demo", vocab_size=2048, max_seq_len=1024))
    model.init_weights(seed=0)
    model.eval()
    rng = random.Random(0)
    users = [[[rng.randrange(3, 2048) for _ in range(rng.randint(8, 20))] for _ in range(TURNS)]
             for _ in range(DIALOGS)]

    def run(cache: PrefixCache | None) -> tuple[float, list]:
        histories = [[1] for _ in range(DIALOGS)]
        replies, start = [], time.perf_counter()
        for turn in range(TURNS):
            histories = [h + users[i][turn] for i, h in enumerate(histories)]
            out = generate(model, histories, REPLY, stop_ids=[], temperature=0, samples_per_prompt=SAMPLES,
                           prefix_cache=cache, cache_keys=list(range(DIALOGS)) if cache is not None else None)
            chosen = out.tokens[::SAMPLES]
            replies.append(chosen)
            histories = [h + r + [2, 1] for h, r in zip(histories, chosen, strict=True)]
        return time.perf_counter() - start, replies

    full_s, full = run(None)
    cached_s, cached = run(PrefixCache())
    return [{"benchmark": f"{DIALOGS} dialogs x {TURNS} turns x {SAMPLES} samples of {REPLY} tokens, toy-demo",
             "before": f"{full_s:.1f} s (whole history each turn)", "now": f"{cached_s:.1f} s (prefix cache)",
             "speed-up": f"{full_s / cached_s:.2f}x", "same tokens": cached == full}]


def _meta_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's `sample_top_p`, for comparison."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sort[torch.cumsum(probs_sort, dim=-1) - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1))


def _top_p_rows() -> list[dict]:
    probs = (torch.randn(352, 2048, generator=torch.Generator().manual_seed(0)) * 8).softmax(-1)
    meta = best_time(lambda: _meta_top_p(probs, 0.9), repeats=20)
    ours = best_time(lambda: sample_top_p(probs, 0.9), repeats=20)
    return [{"benchmark": "one top-p draw, 352 rows x 2048 tokens", "before": f"{meta * 1e3:.1f} ms (Meta's)",
             "now": f"{ours * 1e3:.1f} ms", "speed-up": f"{meta / ours:.1f}x", "same tokens": "same distribution"}]


def run() -> list[dict]:
    torch.manual_seed(0)
    return _dialog_rows() + _top_p_rows()


if __name__ == "__main__":
    print(f"machine: {machine()}\n")
    print(markdown_table(run()))
