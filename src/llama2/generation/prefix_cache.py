"""Keys and values of prompts already prefilled, kept between `generate` calls.

A multi-turn dialog is sent again whole at every turn, so each turn's prefill recomputes its history: Ghost
Attention samples 20 turns of 88 dialogs near the 1024-token context, and there the prefill of the history
took two thirds of every turn. With a `PrefixCache`, `generate` stores each prompt's keys and values under a
key the caller chooses (the dialog's index); the next prompt under that key prefills only the tokens after
their longest common prefix. A rotary key depends on its token's position only, never on the padding before
it, so stored keys are reused whatever the new batch's layout. Only the prompt is stored (the next turn
re-encodes the chosen reply, which may not be the tokens sampled), and any change in the history, not only
an appended turn, is handled: the common prefix just ends earlier.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from llama2.model.transformer import Transformer


def common_prefix(stored: Sequence[int], ids: Sequence[int]) -> int:
    """Leading tokens of `ids` equal to those of `stored`; at most all but the last of `ids`, which is always fed
    to get the next token's logits."""
    limit = min(len(stored), len(ids) - 1)
    return next((i for i in range(limit) if stored[i] != ids[i]), limit)


class PrefixCache:
    """Per key: the prompt ids and their keys and values, (n_layers, 2, n_kv_heads, len, head_dim)."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[list[int], torch.Tensor]] = {}

    def reusable(self, key: Hashable, ids: Sequence[int]) -> int:
        """Leading tokens of `ids` whose keys and values are stored under `key`; at most all but the last,
        which is always fed to get the next token's logits."""
        entry = self._entries.get(key)
        return 0 if entry is None else common_prefix(entry[0], ids)

    def load(self, model: Transformer, key: Hashable, count: int, row: int, slot: int) -> None:
        """Write the first `count` stored keys and values of `key` into the model's cache row `row` from slot
        `slot` on."""
        kv = self._entries[key][1]
        for layer, stored in zip(model.layers, kv, strict=True):
            attn = layer.attention
            attn.cache_k[row, :, slot : slot + count] = stored[0, :, :count]
            attn.cache_v[row, :, slot : slot + count] = stored[1, :, :count]

    def store(self, model: Transformer, key: Hashable, ids: Sequence[int], row: int, slot: int) -> None:
        """Keep the keys and values of `ids`, prefilled in the model's cache row `row` from slot `slot` on."""
        end = slot + len(ids)
        attns = [layer.attention for layer in model.layers]
        kv = torch.stack([torch.stack((a.cache_k[row, :, slot:end], a.cache_v[row, :, slot:end])) for a in attns])
        self._entries[key] = (list(ids), kv)
