"""Pure metric functions of the benchmark tasks, transcribed from lm-eval 0.4.13 so that numbers compare.

Nothing here touches a model: each function turns log-likelihoods or generated text into a score, which is
what the unit tests pin down with hand-computed cases.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------ multiple choice


@dataclass(frozen=True)
class ChoiceResult:
    """One multiple-choice item: the predicted index by raw and by length-normalised log-likelihood."""

    pred: int
    pred_norm: int
    gold: int

    @property
    def acc(self) -> float:
        return float(self.pred == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.gold)


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum, as `np.argmax` breaks ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_choices(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> ChoiceResult:
    """lm-eval's `acc` and `acc_norm` (ConfigurableTask.process_results, lm_eval/api/task.py, multiple_choice).

    `acc_norm` divides each log-likelihood by the *character* length of the choice text as the task lists it,
    without the target delimiter (`len(choice)` in Python: characters, not tokens and not UTF-8 bytes; lm-eval
    calls the byte version `acc_bytes`). It removes the bias towards short answers, which lose less
    probability simply by having fewer tokens.
    """
    if len(loglikelihoods) != len(choices):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    normalised = [ll / len(c) for ll, c in zip(loglikelihoods, choices, strict=True)]
    return ChoiceResult(_argmax(loglikelihoods), _argmax(normalised), gold)


# -------------------------------------------------------------------------------------------------- GSM8K

INVALID = "[invalid]"
"""What lm-eval's regex filter returns when nothing matches (`RegexFilter.fallback`)."""

COT_STRICT = r"The answer is (\-?[0-9\.\,]+)."
"""gsm8k-cot's strict-match: the number after the exemplars' closing phrase (tasks/gsm8k/gsm8k-cot.yaml)."""
PLAIN_STRICT = r"#### (\-?[0-9\.\,]+)"
"""gsm8k's strict-match: the number after GSM8K's own `#### ` answer marker (tasks/gsm8k/gsm8k.yaml)."""
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
"""Both tasks' flexible-extract pattern, taking the last match: the last number in the text."""

_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
"""`regexes_to_ignore` of both GSM8K tasks' exact_match, applied in this order to prediction and reference."""


def regex_extract(text: str, pattern: str, group_select: int = 0) -> str:
    """lm-eval's `RegexFilter.apply` on one response (lm_eval/filters/extraction.py).

    Takes match number `group_select` of `re.findall`; with alternation groups, the first non-empty group.
    """
    matches = re.findall(pattern, text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        nonempty = [m for m in match if m]
        match = nonempty[0] if nonempty else INVALID
    return match.strip()


def strict_extract(text: str, pattern: str = COT_STRICT) -> str:
    return regex_extract(text, pattern, group_select=0)


def flexible_extract(text: str) -> str:
    return regex_extract(text, FLEXIBLE, group_select=-1)


def normalize_answer(text: str) -> str:
    """exact_match's normalisation: drop commas, dollar signs, a worked solution up to `#### `, a final period;
    then lowercase (`ignore_case: true`)."""
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_reference(answer: str) -> str:
    """The gold number of a GSM8K solution: the text after its last `####` (gsm8k-cot's doc_to_target)."""
    return answer.split("####")[-1].strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut a generation at the first stop string, as lm-eval's `generate_until` does with `until`."""
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            text = text[:index]
    return text


# --------------------------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Window:
    """One forward pass of strided perplexity: input ids `[begin, end)` of the sequence, of which the last
    `end - scored_from` targets (ids `scored_from + 1 .. end`) are new and are scored."""

    begin: int
    scored_from: int
    end: int


def strided_windows(n_targets: int, max_len: int, stride: int) -> list[Window]:
    """Windows covering targets 1..n_targets of a sequence `s[0..n_targets]` (s[0] is BOS) once each.

    Each pass feeds at most `max_len` ids and scores the `stride` targets after the previous pass, so every
    target but the first `max_len` sees at least `max_len - stride` ids of context. `stride == max_len` gives
    disjoint windows, which is lm-eval's `loglikelihood_rolling` (`get_rolling_token_windows` with
    context_len 1); a smaller stride buys more context per token for more compute.
    """
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len ({max_len}), got {stride}")
    windows = []
    done = 0
    while done < n_targets:
        end = min(done + (max_len if done == 0 else stride), n_targets)
        windows.append(Window(max(0, end - max_len), done, end))
        done = end
    return windows


def perplexity_metrics(total_loglikelihood: float, n_tokens: int, n_bytes: int) -> dict[str, float]:
    """Token perplexity `exp(-LL / tokens)` and bits per byte `-LL / (bytes · ln 2)` (lm-eval's bits_per_byte).

    Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.
    """
    nll = -total_loglikelihood
    return {
        "token_perplexity": math.exp(nll / n_tokens),
        "nll_per_token": nll / n_tokens,
        "bits_per_byte": nll / (n_bytes * math.log(2)),
        "tokens": n_tokens,
        "bytes": n_bytes,
    }


# ----------------------------------------------------------------------------------------------- win rate


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> dict[str, float]:
    """Share of prompts where A's reply scores higher than B's, ties counted as half a win."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = sum(a > b for a, b in zip(scores_a, scores_b, strict=True))
    ties = sum(a == b for a, b in zip(scores_a, scores_b, strict=True))
    n = len(scores_a)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties}


def paired_difference(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean per-prompt change from `before` to `after` (two models' scores on the same prompts) and its standard
    error. Pairing matters: a stage changes few of its start's replies, so the error of the change is far
    smaller than either mean's own, and far smaller than the difference of two means suggests."""
    n = len(before)
    if n != len(after) or n < 2:
        raise ValueError(f"paired_difference needs two equally long score lists of 2 or more, got {n} and {len(after)}")
    d = [b - a for a, b in zip(before, after, strict=True)]
    mean = sum(d) / n
    variance = sum((x - mean) ** 2 for x in d) / (n - 1)
    return {"difference": mean, "standard_error": math.sqrt(variance / n), "prompts": n,
            "changed": sum(x != 0 for x in d)}


# ------------------------------------------------------------------------------------------------ sampling


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the examples to evaluate: all, or `limit` drawn by `seed` and kept in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))
