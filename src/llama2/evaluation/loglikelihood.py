"""Log-likelihood of a continuation given a context, computed exactly as EleutherAI's lm-eval harness does.

Multiple-choice benchmarks (PIQA, OpenBookQA, TruthfulQA MC, ...) and perplexity all reduce to one question:
what is `sum log p(continuation tokens | context tokens)`? Matching lm-eval's answer token for token is what
makes our numbers comparable with published ones, so each rule below is lm-eval 0.4.13's:

- Tokenisation (`TemplateLM._encode_pair`, lm_eval/api/model.py): trailing spaces of the context move to the
  front of the continuation; the whole string is encoded once and split at the context's own token length.
  Encoding adds BOS, as a Hugging Face Llama tokenizer does by default (`HFLM.tok_encode` with
  `add_bos_token=None`). An empty context becomes BOS alone (`TemplateLM.loglikelihood`).
- Scoring (`HFLM._loglikelihood_tokens`, lm_eval/models/huggingface.py): the input is
  `(context + continuation)[-(max_len + 1):][:-1]`, right-padded into a batch; the result is the summed
  log-softmax of the continuation tokens and whether greedy argmax reproduces every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llama2.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenRequest:
    """One scoring request in token ids: score `continuation` after `context` (both non-empty)."""

    context: list[int]
    continuation: list[int]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> TokenRequest:
    """lm-eval's split of `context + continuation` into ids (see the module docstring)."""
    if not context:
        cont = tokenizer.encode(continuation, bos=False, eos=False)
        if cont and cont[0] == tokenizer.bos_id:
            return TokenRequest(cont[:1], cont[1:])
        return TokenRequest([tokenizer.bos_id], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True, eos=False)
    n_context = len(tokenizer.encode(context, bos=True, eos=False))
    return TokenRequest(whole[:n_context], whole[n_context:])


@torch.inference_mode()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[TokenRequest],
    max_len: int,
    batch_size: int = 16,
    desc: str = "log-likelihoods",
) -> list[tuple[float, bool]]:
    """(sum log-prob of the continuation, is it the greedy continuation) per request, in request order.

    Requests run longest first, as in lm-eval, so the first batch shows at once whether memory suffices and
    right padding is minimal; causal attention keeps the padding from touching any real position.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[start : start + batch_size]]
            rows = []
            for r in batch:
                if not r.context or not r.continuation:
                    raise ValueError("a scoring request needs a non-empty context and continuation")
                if len(r.continuation) > max_len:
                    raise ValueError(f"continuation of {len(r.continuation)} tokens exceeds max_len {max_len}")
                rows.append((r.context + r.continuation)[-(max_len + 1) :][:-1])
            width = max(len(row) for row in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)  # pad id is irrelevant: padding is on the right
            for b, row in enumerate(rows):
                tokens[b, : len(row)] = torch.tensor(row)
            logits = model(tokens.to(device))  # (B, width, vocab)
            for b, (row, r) in enumerate(zip(rows, batch, strict=True)):
                n = len(r.continuation)
                # Positions len(row)-n .. len(row)-1 predict the n continuation tokens.
                logprobs = torch.log_softmax(logits[b, len(row) - n : len(row)].float(), dim=-1)  # (n, vocab)
                target = torch.tensor(r.continuation, device=logprobs.device)
                total = float(logprobs.gather(1, target[:, None]).sum())
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[order[start + b]] = (total, greedy)
            bar.update(len(batch))
    return results


def loglikelihoods(llm, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` for a `Llama`: per (context, continuation), (sum log-prob, is_greedy).

    Put the word-boundary space in the continuation (`("Answer:", " yes")`), as lm-eval tasks do.
    """
    requests = [encode_pair(llm.tokenizer, c, x) for c, x in pairs]
    return score_requests(llm.model, requests, llm.args.max_seq_len, batch_size)
