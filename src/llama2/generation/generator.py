"""Batched KV-cache generation over token lists (Meta's `generate`, trainable model, any device).

Prompts of different lengths share one batch, left-padded to the longest: every prompt is prefilled in one
pass and all rows then decode in lockstep, one cache slot per step. Each row keeps its own rotary positions
(a row's first real token is position 0 whatever its padding) and never attends to its padding slots, so a
row's tokens are those it would get alone. Meta's reference lays prompts out left-aligned instead and
decodes from the shortest prompt's end with prompt tokens forced, which costs one full step per token of
length spread: 130 extra steps for prompts of 20 to 150 tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama2.generation.compiled_step import CompiledGreedyStep, compiled_greedy_step, compiled_step
from llama2.generation.cuda_graph import graphed_step
from llama2.generation.prefix_cache import PrefixCache
from llama2.generation.sampling import next_token
from llama2.generation.screened_argmax import screenable
from llama2.generation.step_cache import CacheOwningStep
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
    prefix_cache: PrefixCache | None = None,
    cache_keys: Sequence[Hashable] | None = None,
) -> GenerationOutput:
    """Generate for a batch of ragged prompts. `cuda_graph` (default: on for CUDA models in eval mode)
    replays each decoding step from a captured graph; `compile` (off by default: the first call per batch
    size and cache length compiles for tens of seconds) runs it through `torch.compile` instead, the fast
    path on a CPU. The tokens are the same either way, up to floating-point reassociation.

    `samples_per_prompt` n > 1 returns n samples of each prompt, prompt-major (row `i * n + j` is sample j
    of prompt i), the same rows as passing each prompt n times; but each prompt is prefilled once and its
    KV cache copied to its n rows, which saves most of the work when long prompts are sampled many times
    (Ghost Attention samples several replies at every turn of a long dialog).

    With a `prefix_cache` and one key per prompt in `cache_keys`, each prompt's keys and values are stored
    under its key, and a prompt sharing a prefix with the one stored under its key prefills only the tokens
    after it (see `prefix_cache`): the next turn of a dialog costs its new tokens, not its whole history."""
    args = model.args
    _validate_prompts(prompts, args.vocab_size, args.max_seq_len)
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be at least 1, got {max_gen_len}")
    n = samples_per_prompt
    if n < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {n}")
    reuse = _reusable(prefix_cache, cache_keys, prompts)
    full = echo and logprobs  # every prompt slot's logits, not only the last one's
    if full and any(reuse):
        raise ValueError("echo with logprobs scores every prompt token, so it cannot reuse a prefix cache")
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
    step = _decode_step(model, bsz, width, cuda_graph, compile, greedy=temperature == 0 and not logprobs)
    screened = isinstance(step, CompiledGreedyStep)
    if step is None:
        model.setup_cache(bsz, width)
    else:
        step_mask = F.pad(real, (0, step.cache_len - width), value=True)[:, None, None, :]  # (B, 1, 1, cache)
    ragged = bool((pad > 0).any())  # equal lengths (batch 1 included): plain causal attention, no mask
    try:
        # Each prompt once (rows 0..m-1, in the order `_prefill` fed them); its KV cache is then copied to the n
        # rows that sample it (prompt-major).
        hidden, fed_row = _prefill(model, tokens[::n, :max_len], positions[::n, :max_len], real[::n, :max_len],
                                   ragged, [len(p) for p in prompts[::n]], reuse, prefix_cache, cache_keys, full)
        _arrange_cache_rows(model, fed_row.repeat_interleave(n), max_len)
        logits = model.output(hidden).float().repeat_interleave(n, 0)  # (B, 1 or max_len, V)
        if full:
            token_logprobs[:, 1:max_len] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:max_len], reduction="none")
            token_logprobs[:, :max_len] *= slots[:max_len] > pad[:, None]  # a prompt's first token has none
            logits = logits[:, -1:]
        cur_pos = max_len
        held = torch.arange(bsz, device=device)  # the rows the eager path's cache holds, in cache order
        nxt = next_token(logits[:, -1], temperature, top_p, top_k, generator)
        while True:
            tokens[:, cur_pos] = nxt
            if token_logprobs is not None:
                token_logprobs[:, cur_pos] = -F.cross_entropy(logits[:, -1], nxt, reduction="none")
            done |= torch.isin(nxt, stop) | (cur_pos + 1 - max_len >= limits)
            if cur_pos + 1 == width or bool(done.all()):
                break
            if step is not None:
                feed, pos = tokens[:, cur_pos : cur_pos + 1], positions[:, cur_pos : cur_pos + 1]
                if screened:
                    nxt = step(feed, cur_pos, pos, step_mask)
                else:
                    logits = step(feed, cur_pos, pos, step_mask)
            else:
                held = _drop_finished_rows(model, held, done, cur_pos)
                feed, pos = tokens[held, cur_pos : cur_pos + 1], positions[held, cur_pos : cur_pos + 1]
                mask = real[held, None, None, : cur_pos + 1] if ragged else None
                fed = model(feed, cur_pos, mask, pos if ragged else None)
                if len(held) == bsz:
                    logits = fed
                else:
                    logits[held] = fed  # finished rows keep their last logits
            cur_pos += 1
            if not screened:
                nxt = next_token(logits[:, -1], temperature, top_p, top_k, generator)
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


def _decode_step(model: Transformer, batch_size: int, cache_len: int, cuda_graph: bool, compile: bool,
                 greedy: bool) -> CacheOwningStep | None:
    """The step that decodes after the prefill, or None for the eager model. One fp32 sequence decoded greedily
    (without log-probs) needs only the next token: its compiled step screens the output matrix for it (see
    `screened_argmax`) and returns the token instead of the logits; a vocabulary of one screening block is
    not worth screening."""
    if cuda_graph:
        return graphed_step(model, batch_size, cache_len)
    if not compile:
        return None
    if greedy and batch_size == 1 and screenable(model.output.weight):
        return compiled_greedy_step(model, cache_len)
    return compiled_step(model, batch_size, cache_len)


def _prefill(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, ragged: bool,
             lengths: list[int], reuse: list[int], prefix_cache: PrefixCache | None,
             cache_keys: Sequence[Hashable] | None, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill cache rows 0..m-1 with the m left-padded prompts (m, max_len); return their hidden states in prompt
    order (the last slot's (m, 1, dim), or every slot's when `full`) and, per prompt, the cache row that holds
    it (rows are in feeding order). Prompt j's first `reuse[j]` tokens come from the prefix cache (which then
    keeps all of them); its other tokens are fed through the model. With a prefix cache the prompts are fed in
    groups of similar length to feed (the last slots of each row, as many as its longest in the group needs),
    longest first, so that one dialog whose history changed does not make every row of the batch prefill its
    whole history again."""
    m, max_len = tokens.shape
    fresh = [n - r for n, r in zip(lengths, reuse, strict=True)]
    grouped = prefix_cache is not None and not full
    order = sorted(range(m), key=lambda j: -fresh[j]) if grouped else list(range(m))
    rows = torch.tensor(order, device=tokens.device)
    tokens, positions, real = tokens[rows], positions[rows], real[rows]
    for r, j in enumerate(order):
        if reuse[j]:
            prefix_cache.load(model, cache_keys[j], reuse[j], r, max_len - lengths[j])
    slots = torch.arange(max_len, device=tokens.device)
    hidden = []
    for a, b in _groups([fresh[j] for j in order]) if grouped else [(0, m)]:
        start = max_len - max(fresh[j] for j in order[a:b])
        # Causal over real slots; a padding slot sees itself only, so no row of the softmax is empty.
        fed, seen = slots[start:, None], slots[None, :]
        mask = ((seen <= fed) & (real[a:b, None, :] | (seen == fed)))[:, None] if ragged else None
        with _cache_rows(model, a, b):
            h = model.hidden_states(tokens[a:b, start:], start, mask, positions[a:b, start:] if ragged else None)
        hidden.append(h if full else h[:, -1:])
    if prefix_cache is not None:
        for r, j in enumerate(order):
            prefix_cache.store(model, cache_keys[j], tokens[r, max_len - lengths[j] :].tolist(), r,
                               max_len - lengths[j])
    fed_row = torch.tensor(sorted(range(m), key=lambda r: order[r]), device=tokens.device)  # prompt j's row
    return torch.cat(hidden)[fed_row], fed_row


def _groups(fresh: list[int]) -> list[tuple[int, int]]:
    """Row ranges [a, b) of `fresh` (descending) where every row feeds more than half the group's longest."""
    out, a = [], 0
    for r in range(1, len(fresh)):
        if 2 * fresh[r] <= fresh[a]:
            out.append((a, r))
            a = r
    return [*out, (a, len(fresh))]


@contextmanager
def _cache_rows(model: Transformer, a: int, b: int) -> Iterator[None]:
    """Let a forward pass over batch rows a..b-1 read and fill those rows of every layer's KV cache."""
    caches = [(layer.attention.cache_k, layer.attention.cache_v) for layer in model.layers]
    for layer, (k, v) in zip(model.layers, caches, strict=True):
        layer.attention.cache_k, layer.attention.cache_v = k[a:b], v[a:b]
    try:
        yield
    finally:
        for layer, (k, v) in zip(model.layers, caches, strict=True):
            layer.attention.cache_k, layer.attention.cache_v = k, v


def _reusable(prefix_cache: PrefixCache | None, cache_keys: Sequence[Hashable] | None,
              prompts: Sequence[Sequence[int]]) -> list[int]:
    """Per prompt: the leading tokens whose keys and values `prefix_cache` holds under the prompt's key."""
    if prefix_cache is None:
        return [0] * len(prompts)
    if cache_keys is None or len(cache_keys) != len(prompts):
        raise ValueError(f"a prefix cache needs one key per prompt: {len(prompts)} prompts, "
                         f"{'no' if cache_keys is None else len(cache_keys)} keys")
    return [prefix_cache.reusable(key, p) for key, p in zip(cache_keys, prompts, strict=True)]


def _arrange_cache_rows(model: Transformer, source: torch.Tensor, length: int) -> None:
    """Cache row i's first `length` slots become those of row `source[i]`, for every layer (a copy of rows; a
    no-op when every row keeps its own)."""
    rows = torch.arange(len(source), device=source.device)
    if not torch.equal(source, rows):
        _copy_cache_rows(model, rows, source, length)


def _copy_cache_rows(model: Transformer, rows: torch.Tensor, source: torch.Tensor, length: int) -> None:
    """Cache rows `rows` take the first `length` slots of rows `source`, in every layer (the right-hand side is
    gathered before it is written, so the two may overlap)."""
    for layer in model.layers:
        attn = layer.attention
        for cache in (attn.cache_k, attn.cache_v):
            cache[rows, :, :length] = cache[source, :, :length]


def _drop_finished_rows(model: Transformer, held: torch.Tensor, done: torch.Tensor, length: int) -> torch.Tensor:
    """The rows to decode next: `held` (the batch rows in cache-row order) less its finished ones, whose cache
    rows are filled by moving in the unfinished rows from behind the new end (each layer's first `length`
    slots; only moved rows are copied, so dropping rows at every step costs at most one copy per row). A
    finished row still draws a token at every step, from its last logits, so every row's random numbers, and
    hence its tokens, are those of a batch that decodes all its rows to the end; but it costs nothing in the
    model. Sampling Ghost Attention's dialogs, most replies end long before the few that run to the length
    limit, and each decoding step reads the whole KV cache of every row it feeds."""
    keep = ~done[held]
    n = int(keep.sum())
    if n == len(held):
        return held
    holes = (~keep[:n]).nonzero().squeeze(1)  # finished rows before the new end
    movers = keep[n:].nonzero().squeeze(1) + n  # unfinished rows after it, as many
    if len(holes):
        _copy_cache_rows(model, holes, movers, length)
        held = held.clone()
        held[holes] = held[movers]
    return held[:n]


def generate_texts(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_gen_len: int,
                   temperature: float, top_p: float, batch_size: int,
                   generator: torch.Generator | None = None, samples_per_prompt: int = 1) -> list[str]:
    """`samples_per_prompt` sampled answers per prompt (prompt-major), decoded and stripped, in batches of about
    `batch_size` rows; each prompt is prefilled once for all its samples (rejection sampling spent 39 of its 97
    s of decoding prefilling each prompt 8 times). The one `generator` runs on across batches, so a seeded run
    is reproducible at a given batch size."""
    n = samples_per_prompt
    step = max(1, batch_size // n)
    texts: list[str] = []
    for start in range(0, len(prompts), step):
        out = generate(model, prompts[start : start + step], max_gen_len, [tokenizer.eos_id], temperature,
                       top_p, generator=generator, samples_per_prompt=n)
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
    prefix_cache: PrefixCache | None = None,
    cache_key: Hashable = 0,
    compile: bool = False,
) -> Iterator[int]:
    """Yield generated ids one at a time for a single prompt; stops at a stop id (not yielded). With a
    `prefix_cache`, the prompt's prefix stored under `cache_key` is not prefilled again and the prompt is
    stored in its place: a chat's next turn prefills only what was said since. `compile` decodes through the
    compiled step, as `generate` does (greedy through the screened one): the same tokens, up to floating-point
    reassociation (which can move a sampled draw that lands on a boundary of the distribution)."""
    args = model.args
    _validate_prompts([prompt], args.vocab_size, args.max_seq_len)
    device = model.output.weight.device
    total_len = min(args.max_seq_len, len(prompt) + max_gen_len)
    step = _decode_step(model, 1, total_len, cuda_graph=False, compile=compile, greedy=temperature == 0)
    screened = isinstance(step, CompiledGreedyStep)
    if step is None:
        model.setup_cache(1, total_len)
    else:
        everywhere = torch.ones((1, 1, 1, step.cache_len), dtype=torch.bool, device=device)  # no padding slots
    try:
        pos = prefix_cache.reusable(cache_key, prompt) if prefix_cache is not None else 0
        if pos:
            prefix_cache.load(model, cache_key, pos, 0, 0)
        x = torch.tensor([list(prompt[pos:])], dtype=torch.long, device=device)
        logits = model(x, start_pos=pos)
        if prefix_cache is not None:
            prefix_cache.store(model, cache_key, prompt, 0, 0)
        token = next_token(logits[:, -1], temperature, top_p, top_k, generator)
        for cur in range(len(prompt), total_len):
            nxt = int(token[0])
            if nxt in stop_ids:
                return
            yield nxt
            if cur + 1 == total_len:
                return
            x = torch.tensor([[nxt]], dtype=torch.long, device=device)
            if step is None:
                logits = model(x, start_pos=cur)
            else:
                out = step(x, cur, torch.tensor([[cur]], device=device), everywhere)
                if screened:  # the step returned the greedy token itself
                    token = out
                    continue
                logits = out
            token = next_token(logits[:, -1], temperature, top_p, top_k, generator)
    finally:
        if step is None:
            model.clear_cache()
