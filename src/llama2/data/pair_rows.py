"""Preference pairs as one row each: the ids both sides share, once, then the rejected side's own ids.

A pair's chosen and rejected sequences repeat the same prompt: on the demo's helpfulness pairs the prompt is
65 of a pair's 171 ids (38% of what a reward-model step reads twice), on its safety pairs 45 of 149. A row
holds the chosen sequence, then the rejected sequence after the longest prefix the two share. The rejected
part sits at the positions it would have alone and attends to the shared prefix and to itself: a mask hides
the chosen side's own ids from it. Attention is causal, so every state is the state the separate sequence
would have, and so are the rewards and their gradients (tests/data/test_pair_rows.py).

`pair_rows` builds the batch that `ScalarHeadModel.forward(..., pairs=)` reads:

- `tokens`, `positions` (B, L): the rows, right-padded (padding at position 0, never read);
- `mask` (B, 1, L, L): causal, minus the rejected part's view of the chosen side's own ids;
- `chosen_last`, `rejected_last` (B,): where each side's last id sits in the row (its reward is read there);
- `predictor` (B, L): the row index of the state that predicts each id (the one before it, except the rejected
  part's first id, predicted by the end of the shared prefix);
- `in_chosen`, `in_rejected` (B, L): which ids are each side's response (a shared id can be both), the
  tokens a likelihood-gated reward sums over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pair_rows(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], chosen_starts: Sequence[int],
              rejected_starts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch described in the module docstring for B pairs of encoded sequences and response starts."""
    if not chosen or len({len(chosen), len(rejected), len(chosen_starts), len(rejected_starts)}) != 1:
        raise ValueError("pair_rows needs as many rejected sequences and starts as chosen ones, at least one")
    shared = [shared_prefix(c, r) for c, r in zip(chosen, rejected, strict=True)]
    lengths = [len(c) + len(r) - s for c, r, s in zip(chosen, rejected, shared, strict=True)]
    batch, width = len(chosen), max(lengths)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    predictor = (torch.arange(width) - 1).clamp(min=0).repeat(batch, 1)
    in_chosen = torch.zeros((batch, width), dtype=torch.bool)
    in_rejected = torch.zeros((batch, width), dtype=torch.bool)
    hidden = torch.zeros((batch, width, width), dtype=torch.bool)  # query (rejected part) x key (chosen's own)
    chosen_last, rejected_last = [], []
    for i, (c, r, s, cs, rs) in enumerate(zip(chosen, rejected, shared, chosen_starts, rejected_starts,
                                             strict=True)):
        lc, lr = len(c), len(r)
        tokens[i, : lengths[i]] = torch.tensor([*c, *r[s:]], dtype=torch.long)
        positions[i, :lc] = torch.arange(lc)
        positions[i, lc : lengths[i]] = torch.arange(s, lr)
        in_chosen[i, cs:lc] = True
        row_of = list(range(s)) + list(range(lc, lengths[i]))  # the rejected sequence's ids, by row index
        in_rejected[i, row_of[rs:lr]] = True
        if lr > s:
            predictor[i, lc] = s - 1
            hidden[i, lc : lengths[i], s:lc] = True
        chosen_last.append(lc - 1)
        rejected_last.append(row_of[lr - 1])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return {"tokens": tokens, "positions": positions, "mask": (causal & ~hidden)[:, None],
            "chosen_last": torch.tensor(chosen_last), "rejected_last": torch.tensor(rejected_last),
            "predictor": predictor, "in_chosen": in_chosen, "in_rejected": in_rejected}
