"""Keys and values of finished requests, found again by content: the server's prefix cache.

An OpenAI-style client sends the whole conversation with every request, so without this each turn of a chat
prefills its entire history again. The server cannot key conversations by an identity as `llama2 chat`
does (`generation/prefix_cache.py`): requests carry none. So the store keeps the token ids a finished
request left in its KV-cache row (prompt and reply), and a new prompt reuses the longest common prefix
with any of them. A re-encoded reply that differs from the sampled ids, an edited message or another
system prompt just ends the common prefix earlier. Rotary keys depend on their position only, and the
prefix starts at position 0 in both rows, so copied keys are exact. Entries are evicted least recently used
first once the stored tokens pass a budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llama2.generation.prefix_cache import common_prefix
from llama2.serving.batched_forward import SlotCache


@dataclass
class _Entry:
    ids: list[int]
    kv: torch.Tensor
    """(n_layers, 2, n_kv_heads, len(ids), head_dim): keys and values of `ids` at positions 0 …"""


class PrefixStore:
    """At most `max_tokens` stored positions over all entries; 0 stores nothing."""

    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"a prefix store holds a number of tokens >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.tokens = 0
        """Positions stored now, over all entries."""

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids: Sequence[int]) -> tuple[int | None, int]:
        """(entry key, count): the stored entry sharing the longest prefix with `ids`, and its length, at most
        all but the last id (which is always fed, to get the next token's logits). (None, 0) when none."""
        best, best_count = None, 0
        for key, entry in self._entries.items():
            count = common_prefix(entry.ids, ids)
            if count > best_count:
                best, best_count = key, count
        if best is not None:
            self._entries.move_to_end(best)
        return best, best_count

    def load(self, key: int, count: int, cache: SlotCache, row: int) -> None:
        """Write the first `count` stored positions of entry `key` into positions 0 … count-1 of cache row `row`."""
        kv = self._entries[key].kv
        for layer, (k_cache, v_cache) in enumerate(zip(cache.keys, cache.values, strict=True)):
            k_cache[row, :, :count] = kv[layer, 0, :, :count]
            v_cache[row, :, :count] = kv[layer, 1, :, :count]

    def store(self, ids: Sequence[int], cache: SlotCache, row: int) -> None:
        """Keep the keys and values of `ids`, held at positions 0 … len(ids)-1 of cache row `row`.

        An entry that is a prefix of `ids` is replaced by it; if `ids` is a prefix of an entry, nothing new is
        kept. A sequence longer than the whole budget is not kept."""
        if not ids or len(ids) > self.max_tokens:
            return
        new = list(ids)
        for key, entry in list(self._entries.items()):
            n = min(len(entry.ids), len(new))
            if entry.ids[:n] == new[:n]:
                if len(entry.ids) >= len(new):
                    self._entries.move_to_end(key)
                    return
                self._drop(key)
        length = len(new)
        kv = torch.stack([torch.stack((k[row, :, :length], v[row, :, :length]))
                          for k, v in zip(cache.keys, cache.values, strict=True)])
        self._entries[self._next_key] = _Entry(new, kv)
        self._next_key += 1
        self.tokens += length
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key).ids)
