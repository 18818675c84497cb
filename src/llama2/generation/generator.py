"""Batched KV-cache generation over token lists (Meta's `generate`, trainable model, any device).

Prompts of different lengths share one batch, left-padded to the longest: every prompt is prefilled in one
pass and all rows then decode in lockstep, one cache slot per step. Each row keeps its own rotary positions
(a row's first real token is position 0 whatever its padding) and never attends to its padding slots, so a
row's tokens are those it would get alone. Meta's reference lays prompts out left-aligned instead and
decodes from the shortest prompt's end with prompt tokens forced, which costs one full step per token of
length spread: 130 extra steps for prompts of 20 to 150 tokens.
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
from llama2.tokenizer.tokenizer import Tokenizer


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
    samples_per_prompt: int = 1,
) -> GenerationOutput:
    """Generate for a batch of ragged prompts. `cuda_graph` (default: on for CUDA models in eval mode)
    replays each decoding step from a captured graph; `compile` (off by default: the first call per batch
    size and cache length compiles for tens of seconds) runs it through `torch.compile` instead, the fast
    path on a CPU. The tokens are the same either way, up to floating-point reassociation.

    `samples_per_prompt` n > 1 returns n samples of each prompt, prompt-major (row `i * n + j` is sample j
    of prompt i), the same rows as passing each prompt n times; but each prompt is prefilled once and its
    KV cache copied to its n rows, which saves most of the work when long prompts are sampled many times
    (Ghost Attention samples several replies at every turn of a long dialog)."""
    args = model.args
    _validate_prompts(prompts, args.vocab_size, args.max_seq_len)
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be at least 1, got {max_gen_len}")
    n = samples_per_prompt
    if n < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {n}")
    prompts = [p for p in prompts for _ in range(n)]
    bsz = len(prompts)
    device = model.output.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    max_len = int(lengths.max())
    limits = (args.max_seq_len - lengths).clamp(max=max_gen_len)  # new tokens each row may have
    width = max_len + int(limits.max())  # may exceed the context: rows stop at their own limit
    pad = max_len - lengths  # (B,)

    tokens = torch.zeros((bsz, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, max_len - len(p) : max_len] = torch.tensor(p, dtype=torch.long, device=device)
    slots = torch.arange(width, device=device)
    positions = (slots - pad[:, None]).clamp(min=0)  # (B, width): each row's own rotary positions
    real = slots >= pad[:, None]  # (B, width): False on padding slots
    token_logprobs = torch.zeros((bsz, width), dtype=torch.float, device=device) if logprobs else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)

    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not model.training
    step = graphed_step(model, bsz, width) if cuda_graph else compiled_step(model, bsz, width) if compile else None
    if step is None:
        model.setup_cache(bsz, width)
    else:
        step_mask = F.pad(real, (0, step.cache_len - width), value=True)[:, None, None, :]  # (B, 1, 1, cache)
    ragged = bool((pad > 0).any())  # equal lengths (batch 1 included): plain causal attention, no mask
    try:
        # Prefill: causal over real slots; a padding slot sees itself only, so no row of the softmax is empty.
        prefill_mask = (slots[None, :max_len] <= slots[:max_len, None]) & (
            real[::n, None, :max_len] | torch.eye(max_len, dtype=torch.bool, device=device))
        # Each prompt once (rows 0, n, 2n, ...); its KV cache is then copied to the n rows that sample it.
        hidden = model.hidden_states(tokens[::n, :max_len], 0, prefill_mask[:, None] if ragged else None,
                                     positions[::n, :max_len] if ragged else None)
        if n > 1:
            _share_prefill(model, n, bsz, max_len)
        if echo and token_logprobs is not None:
            logits = model.output(hidden).float().repeat_interleave(n, 0)
            token_logprobs[:, 1:max_len] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:max_len], reduction="none")
            token_logprobs[:, :max_len] *= slots[:max_len] > pad[:, None]  # a prompt's first token has none
            logits = logits[:, -1:]
        else:
            logits = model.output(hidden[:, -1:]).float().repeat_interleave(n, 0)  # (B, 1, V)
        cur_pos = max_len
        while True:
            nxt = next_token(logits[:, -1], temperature, top_p, top_k, generator)
            tokens[:, cur_pos] = nxt
            if token_logprobs is not None:
                token_logprobs[:, cur_pos] = -F.cross_entropy(logits[:, -1], nxt, reduction="none")
            done |= torch.isin(nxt, stop) | (cur_pos + 1 - max_len >= limits)
            if cur_pos + 1 == width or bool(done.all()):
                break
            feed, pos = tokens[:, cur_pos : cur_pos + 1], positions[:, cur_pos : cur_pos + 1]
            if step is not None:
                logits = step(feed, cur_pos, pos, step_mask)
            elif ragged:
                logits = model(feed, cur_pos, real[:, None, None, : cur_pos + 1], pos)
            else:
                logits = model(feed, cur_pos)
            cur_pos += 1
    finally:
        if step is None:
            model.clear_cache()

    out_tokens, out_logprobs = [], []
    rows = tokens[:, : cur_pos + 1].tolist()
    lp_rows = token_logprobs[:, : cur_pos + 1].tolist() if token_logprobs is not None else None
    stop_set = set(stop_ids)
    for i, row in enumerate(rows):
        first = max_len - len(prompts[i]) if echo else max_len
        generated = row[max_len : max_len + int(limits[i])]
        cut = next((j for j, t in enumerate(generated) if t in stop_set), len(generated))
        out_tokens.append(row[first : max_len + cut])
        if lp_rows is not None:
            out_logprobs.append(lp_rows[i][first : max_len + cut])
    return GenerationOutput(out_tokens, out_logprobs if logprobs else None)


def _share_prefill(model: Transformer, n: int, bsz: int, length: int) -> None:
    """Copy the prefilled cache rows 0..bsz/n-1 to rows 0..bsz-1, each n times (prompt-major)."""
    for layer in model.layers:
        attn = layer.attention
        for cache in (attn.cache_k, attn.cache_v):
            cache[:bsz, :, :length] = cache[: bsz // n, :, :length].repeat_interleave(n, 0)


def generate_texts(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_gen_len: int,
                   temperature: float, top_p: float, batch_size: int,
                   generator: torch.Generator | None = None) -> list[str]:
    """One sampled answer per prompt, decoded and stripped, `batch_size` prompts at a time; the one `generator`
    runs on across batches, so a seeded run is reproducible at a given batch size."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start : start + batch_size], max_gen_len, [tokenizer.eos_id], temperature,
                       top_p, generator=generator)
        texts += [tokenizer.decode(t).strip() for t in out.tokens]
    return texts


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
