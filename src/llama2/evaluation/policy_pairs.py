"""Preference pairs of a model's own samples, labelled by the toy world's annotator.

The templated test pairs compare answers of known kinds (right, wrong, verbose, a needless refusal, ...).
Best-of-N, rejection sampling and PPO ask the reward model something else: which of two samples of the
current policy is better. SPEC §6 collects its preference batches on the latest chat model's samples for
that reason ("so the RM stays on-distribution"). Here each held-out prompt gets two samples of the model, at
the temperatures of `TEMPERATURES` (the paper's "varied temperature"), and the oracle ranks them with the
same annotator noise as the templated pairs (`toyworld.pairs.annotate_helpfulness`). An RM's accuracy on
these pairs, next to their label ceiling, is the number that says whether the RLHF stages can gain from it.
"""

from __future__ import annotations

import random

import torch

from llama2.data.formats import PreferenceRecord
from llama2.data.toyworld.pairs import annotate_helpfulness, pair_prompt
from llama2.generation.generator import generate_texts
from llama2.model.transformer import Transformer
from llama2.tokenizer.chat_format import encode_dialog
from llama2.tokenizer.tokenizer import Tokenizer

TEMPERATURES = (0.7, 1.2)


def sample_pairs(model: Transformer, tokenizer: Tokenizer, world, prompts: int, max_gen_len: int = 48,
                 batch_size: int = 64, seed: int = 0) -> list[PreferenceRecord]:
    """Helpfulness pairs of `model`'s two samples on `prompts` held-out prompts; a prompt whose two samples are
    the same text (or one is empty), or that leaves no room for `max_gen_len` tokens in the model's context,
    gives no pair."""
    rng = random.Random(f"policy-pairs-{seed}")
    room = model.args.max_seq_len - max_gen_len
    encoded = [(d, encode_dialog(tokenizer, d)) for d in (pair_prompt(world, "helpfulness", rng, "test")
                                                          for _ in range(prompts))]
    dialogs, ids = [d for d, i in encoded if len(i) <= room], [i for _, i in encoded if len(i) <= room]
    if not ids:
        return []
    device = model.output.weight.device
    samples = []
    for i, temperature in enumerate(TEMPERATURES):
        generator = torch.Generator(device).manual_seed(seed * len(TEMPERATURES) + i)
        samples.append(generate_texts(model, tokenizer, ids, max_gen_len, temperature, 1.0, batch_size, generator))
    records = (annotate_helpfulness(world, d, a, b, rng) for d, a, b in zip(dialogs, *samples, strict=True))
    return [r for r in records if r is not None]
