"""Log-likelihood benchmarks: perplexity on text, and PIQA / OpenBookQA multiple choice (SPEC §11).

Multiple choice follows lm-eval 0.4.13's `multiple_choice` output type: every choice is scored as the
continuation `" " + choice` of the task's prompt, and the item counts for `acc` when the highest
log-likelihood is the gold choice, for `acc_norm` when the highest per-character log-likelihood is.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from llama2.data.formats import read_text
from llama2.evaluation.benchmark_data import ChoiceItem, read_openbookqa, read_piqa
from llama2.evaluation.fewshot import TARGET_DELIMITER, choose_shots, fewshot_context
from llama2.evaluation.loglikelihood import TokenRequest, loglikelihoods, score_requests
from llama2.evaluation.options import int_option
from llama2.evaluation.paths import task_data
from llama2.evaluation.registry import EvalContext, task
from llama2.evaluation.scoring import perplexity_metrics, sample_indices, score_choices, strided_windows


def mean_stderr(values: list[float]) -> float:
    """Standard error of a mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def evaluate_choices(ctx: EvalContext, name: str, items: list[ChoiceItem], num_fewshot: int) -> dict[str, Any]:
    """acc / acc_norm over the sampled items; shots, if any, come from the same set (there is no train split)."""
    indices = sample_indices(len(items), ctx.limit, ctx.seed)
    pairs: list[tuple[str, str]] = []
    for i in indices:
        shots = [(items[j].context, items[j].choices[items[j].gold])
                 for j in choose_shots(len(items), i, num_fewshot, ctx.seed)]
        context = fewshot_context(shots, items[i].context)
        pairs += [(context, TARGET_DELIMITER + choice) for choice in items[i].choices]
    scores = loglikelihoods(ctx.llm, pairs, ctx.batch_size)
    results, start = [], 0
    for i in indices:
        n = len(items[i].choices)
        results.append(score_choices([ll for ll, _ in scores[start : start + n]], items[i].choices, items[i].gold))
        start += n
    if ctx.out_dir is not None:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with (ctx.out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for i, r in zip(indices, results, strict=True):
                f.write(json.dumps({"index": i, "gold": r.gold, "pred": r.pred, "pred_norm": r.pred_norm}) + "\n")
    acc = [r.acc for r in results]
    acc_norm = [r.acc_norm for r in results]
    return {
        "acc": statistics.fmean(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": statistics.fmean(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": len(results),
        "num_fewshot": num_fewshot,
    }


@task("piqa")
def piqa(ctx: EvalContext) -> dict[str, Any]:
    """PIQA validation, 0-shot by default: acc and acc_norm as lm-eval's `piqa` (--option num_fewshot=K)."""
    items = read_piqa(task_data(ctx.data, "piqa"))
    return evaluate_choices(ctx, "piqa", items, int_option(ctx, "num_fewshot", 0))


@task("openbookqa")
def openbookqa(ctx: EvalContext) -> dict[str, Any]:
    """OpenBookQA test, 0-shot by default: acc and acc_norm as lm-eval's `openbookqa` (--option num_fewshot=K)."""
    items = read_openbookqa(task_data(ctx.data, "openbookqa"))
    return evaluate_choices(ctx, "openbookqa", items, int_option(ctx, "num_fewshot", 0))


@task("perplexity")
def perplexity(ctx: EvalContext) -> dict[str, Any]:
    """Token perplexity and bits per byte of --data (.txt or jsonl `text`), strided windows (--option stride=N)."""
    if ctx.data is None:
        raise ValueError("perplexity needs --data: .txt (documents separated by blank lines) or jsonl with 'text'")
    docs = read_text(task_data(ctx.data))
    llm = ctx.llm
    max_len = llm.args.max_seq_len
    stride = int_option(ctx, "stride", max_len)
    requests: list[TokenRequest] = []
    n_tokens = n_bytes = 0
    indices = sample_indices(len(docs), ctx.limit, ctx.seed)
    for i in indices:
        # Each document is scored on its own from BOS, as lm-eval's loglikelihood_rolling does.
        ids = [llm.tokenizer.bos_id] + llm.tokenizer.encode(docs[i].text, bos=False, eos=False)
        for w in strided_windows(len(ids) - 1, max_len, stride):
            requests.append(TokenRequest(ids[w.begin : w.scored_from + 1], ids[w.scored_from + 1 : w.end + 1]))
        n_tokens += len(ids) - 1
        n_bytes += len(docs[i].text.encode("utf-8"))
    scores = score_requests(llm.model, requests, max_len, ctx.batch_size, desc="perplexity")
    metrics = perplexity_metrics(sum(ll for ll, _ in scores), n_tokens, n_bytes)
    return {**metrics, "documents": len(indices), "stride": stride}
