"""Few-shot prompts laid out as lm-eval lays them out in plain text (no chat template).

lm-eval 0.4.13 (`ConfigurableTask.fewshot_context` and `build_qa_turn`, lm_eval/api/task.py) renders each shot
as `question + target_delimiter + answer + fewshot_delimiter` and then the question under evaluation, with the
defaults `target_delimiter=" "` and `fewshot_delimiter="\\n\\n"` (lm_eval/config/task.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def fewshot_context(shots: Sequence[tuple[str, str]], query: str) -> str:
    """`shots` are (question text, answer text) pairs; the result ends with `query`, ready for its answer."""
    return "".join(f"{q}{TARGET_DELIMITER}{a}{FEWSHOT_DELIMITER}" for q, a in shots) + query


def choose_shots(n_items: int, index: int, k: int, seed: int) -> list[int]:
    """`k` example indices other than `index`, fixed by (seed, index), for sets that have no training split.

    Like lm-eval's default sampler when shots come from the evaluated split: draw k+1, drop the item itself.
    """
    if k == 0:
        return []
    if k >= n_items:
        raise ValueError(f"cannot take {k} shots from {n_items} examples (one is the question itself)")
    drawn = random.Random(f"fewshot-{seed}-{index}").sample(range(n_items), k + 1)
    return [i for i in drawn if i != index][:k]
