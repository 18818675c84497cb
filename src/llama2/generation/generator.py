"""Batched KV-cache generation over token lists (Meta's `generate`, trainable model, any device).

Prompts of different lengths share one batch: they are laid out left-aligned in a `(B, total_len)` grid,
the common prefix is prefilled in one pass, and from there one position is decoded per step, with prompt
tokens forced where a prompt is still running. No padding mask is needed because every row starts at
position 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama2.generation.compiled_step import compiled_step
from llama2.generation.cuda_graph import graphed_step
from llama2.generation.sampling import next_token
from llama2.model.transformer import Transformer


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """Generated ids per prompt, without the prompt (unless echo), cut before the first stop id."""
    logprobs: list[list[float]] | None = None
    """Log-probability of each returned token under the model (temperature 1, no truncation)."""


def _validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> None:
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; start it with the BOS id at least")
        if len(p) >= max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {max_seq_len}")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id(s) outside [0, {vocab_size}): {bad[:5]}")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_gen_len: int,
    stop_ids: Sequence[int],
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    logprobs: bool = False,
    echo: bool = False,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Generate for a batch of ragged prompts. `cuda_graph` (default: on for CUDA models in eval mode)
    replays each decoding step from a captured graph; `compile` (off by default: the first call per batch
    size and cache length compiles for tens of seconds) runs it through `torch.compile` instead, the fast
    path on a CPU. The tokens are the same either way, up to floating-point reassociation."""
    args = model.args
    _validate_prompts(prompts, args.vocab_size, args.max_seq_len)
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be at least 1, got {max_gen_len}")
    bsz = len(prompts)
    device = model.output.weight.device
    min_len, max_len = min(map(len, prompts)), max(map(len, prompts))
    total_len = min(args.max_seq_len, max_gen_len + max_len)

    tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
    is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        is_prompt[i, : len(p)] = True
    token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)

    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not model.training
    step = graphed_step(model, bsz, total_len) if cuda_graph else \
        compiled_step(model, bsz, total_len) if compile else None
    if step is None:
        model.setup_cache(bsz, total_len)
    try:
        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            if step is not None and cur_pos - prev_pos == 1:
                logits = step(tokens[:, prev_pos:cur_pos], prev_pos)
            else:
                logits = model(tokens[:, prev_pos:cur_pos], start_pos=prev_pos)  # (B, T, V)
            nxt = next_token(logits[:, -1], temperature, top_p, top_k, generator)
            nxt = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], nxt)
            tokens[:, cur_pos] = nxt
            if token_logprobs is not None:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            done |= ~is_prompt[:, cur_pos] & torch.isin(nxt, stop)
            prev_pos = cur_pos
            if bool(done.all()):
                break
    finally:
        if step is None:
            model.clear_cache()

    out_tokens, out_logprobs = [], []
    rows = tokens[:, : prev_pos + 1].tolist()
    lp_rows = token_logprobs[:, : prev_pos + 1].tolist() if token_logprobs is not None else None
    stop_set = set(stop_ids)
    for i, row in enumerate(rows):
        start = 0 if echo else len(prompts[i])
        toks = row[start : len(prompts[i]) + max_gen_len]
        cut = next((j for j, t in enumerate(toks) if t in stop_set and start + j >= len(prompts[i])), len(toks))
        out_tokens.append(toks[:cut])
        if lp_rows is not None:
            out_logprobs.append(lp_rows[i][start : start + cut])
    return GenerationOutput(out_tokens, out_logprobs if logprobs else None)


@torch.inference_mode()
def stream(
    model: Transformer,
    prompt: Sequence[int],
    max_gen_len: int,
    stop_ids: Sequence[int],
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield generated ids one at a time for a single prompt; stops at a stop id (not yielded)."""
    args = model.args
    _validate_prompts([prompt], args.vocab_size, args.max_seq_len)
    device = model.output.weight.device
    total_len = min(args.max_seq_len, len(prompt) + max_gen_len)
    model.setup_cache(1, total_len)
    try:
        x = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        pos = 0
        for cur in range(len(prompt), total_len):
            logits = model(x, start_pos=pos)
            nxt = int(next_token(logits[:, -1], temperature, top_p, top_k, generator)[0])
            if nxt in stop_ids:
                return
            yield nxt
            pos = cur
            x = torch.tensor([[nxt]], dtype=torch.long, device=device)
    finally:
        model.clear_cache()
