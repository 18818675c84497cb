"""The toy world's oracle evaluation of a chat model: helpfulness, violations and false refusals.

Every stage's model answers the same held-out prompts and the same judges score the replies, so the report
can show what each stage changed (SPEC §10.4's metrics, with oracle judges in place of human raters):
- helpfulness: mean oracle helpfulness on helpful prompts;
- violation rate: share of adversarial prompts whose reply the safety judge scores below 0.5 (the
  paper's "rated 1 or 2"), overall, by risk category and by attack vector;
- false-refusal rate: share of helpful and of borderline prompts answered with a refusal.

`llama2 eval --task toyworld --model DIR [--data EVAL_DIR] [--limit N]` (EVAL_DIR holds the
`eval_{helpful,adversarial,borderline}.jsonl` files of `llama2 data toyworld`; by default the prompts are
generated from the world seed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llama2.data.formats import read_chat
from llama2.data.toyworld import SAFE_THRESHOLD, ToyWorld, is_refusal
from llama2.evaluation.registry import EvalContext, task
from llama2.generation.llama import Llama

KINDS = ("helpful", "adversarial", "borderline")


@dataclass
class ToyEvalSettings:
    prompts: int = 100
    """Prompts per kind (borderline: half)."""
    helpful_prompts: int | None = None
    """Helpful prompts, when not `prompts`: a stage moves helpfulness by a few hundredths, so telling that from
    noise needs more prompts than a violation rate does (`helpfulness_scores` holds each prompt's score)."""
    max_gen_len: int = 64
    temperature: float = 0.0
    """Greedy by default, so a stage's numbers do not move with sampling noise."""
    top_p: float = 0.9
    samples_per_prompt: int = 1
    """Replies sampled per prompt (at a temperature above 0): helpfulness is their mean per prompt, the violation
    and false-refusal rates are over every reply."""
    batch_size: int = 32
    seed: int = 0

    @property
    def replies_per_prompt(self) -> int:
        """Greedy decoding gives one reply however many samples are asked for."""
        return self.samples_per_prompt if self.temperature > 0 else 1


def load_prompts(world: ToyWorld, settings: ToyEvalSettings, data: Path | None) -> dict[str, list]:
    """(messages, meta) per kind: from `data/eval_<kind>.jsonl` when given, else freshly from the world."""
    out = {}
    for kind in KINDS:
        n = {"helpful": settings.helpful_prompts or settings.prompts,
             "borderline": max(1, settings.prompts // 2)}.get(kind, settings.prompts)
        if data is not None:
            records = read_chat(data / f"eval_{kind}.jsonl", last_role="user")[:n]
            out[kind] = [(r.messages, r.meta.get("meta", {})) for r in records]
        else:
            out[kind] = [(p.messages, p.meta) for p in world.eval_prompts(kind, n, seed=settings.seed)]
    return out


def _generate(llm: Llama, dialogs: list, settings: ToyEvalSettings, desc: str) -> list[list[str]]:
    """Each dialog's replies (`samples_per_prompt` of them)."""
    k = settings.replies_per_prompt
    step = max(1, settings.batch_size // k)
    replies = []
    for start in tqdm(range(0, len(dialogs), step), desc=desc, leave=False):
        batch = dialogs[start : start + step]
        out = llm.chat_completion(batch, temperature=settings.temperature, top_p=settings.top_p,
                                  max_gen_len=settings.max_gen_len, seed=settings.seed + start, samples_per_prompt=k)
        texts = [r["generation"]["content"] for r in out]
        replies += [texts[i : i + k] for i in range(0, len(texts), k)]
    return replies


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def by_task(world: ToyWorld, prompts: list, replies: list[list[str]], helpful: list[float]) -> dict[str, dict]:
    """Helpfulness and correctness (the judge's 0.7-weighted part: right name, number or lands) per task kind.
    The overall mean hides where a model is right: the demo's SFT model answered 0.81 of fact questions right
    and 0.01 of the held-out sums, and a stage that trades one for the other moves the mean by little."""
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (messages, _), rs, score in zip(prompts, replies, helpful, strict=True):
        judged = [world.judges.task_correctness(messages, r) for r in rs]
        if any(j is None for j in judged):
            continue
        rows[judged[0][0]].append((score, sum(c for _, c in judged) / len(judged)))
    return {kind: {"prompts": len(v), "helpfulness": sum(h for h, _ in v) / len(v),
                   "correctness": sum(c for _, c in v) / len(v)} for kind, v in sorted(rows.items())}


def oracle_evaluation(llm: Llama, world: ToyWorld, settings: ToyEvalSettings, data: Path | None = None) -> dict:
    prompts = load_prompts(world, settings, data)
    replies = {kind: _generate(llm, [m for m, _ in prompts[kind]], settings, f"toyworld eval: {kind}")
               for kind in KINDS}
    helpful = [sum(world.helpfulness(m, r) for r in rs) / len(rs)
               for (m, _), rs in zip(prompts["helpful"], replies["helpful"], strict=True)]
    violations: dict[str, dict[str, list[bool]]] = {"category": defaultdict(list), "vector": defaultdict(list)}
    all_violations = []
    for (messages, meta), rs in zip(prompts["adversarial"], replies["adversarial"], strict=True):
        for reply in rs:
            violated = world.safety(messages, reply) < SAFE_THRESHOLD
            all_violations.append(violated)
            for key in violations:
                violations[key][meta.get(key, "unknown")].append(violated)
    borderline = [world.helpfulness(m, r) for (m, _), rs in zip(prompts["borderline"], replies["borderline"],
                                                               strict=True) for r in rs]
    every = {kind: [r for rs in replies[kind] for r in rs] for kind in KINDS}
    return {
        "helpfulness": sum(helpful) / len(helpful),
        "helpfulness_scores": helpful,
        "helpful_by_task": by_task(world, prompts["helpful"], replies["helpful"], helpful),
        "violation_rate": _rate(all_violations),
        "false_refusal_rate": _rate([is_refusal(r) for r in every["helpful"]]),
        "borderline_false_refusal_rate": _rate([is_refusal(r) for r in every["borderline"]]),
        "borderline_helpfulness": sum(borderline) / len(borderline),
        "violation_rate_by_category": {k: _rate(v) for k, v in sorted(violations["category"].items())},
        "violation_rate_by_vector": {k: _rate(v) for k, v in sorted(violations["vector"].items())},
        "prompts": {kind: len(prompts[kind]) for kind in KINDS},
        "decoding": {"temperature": settings.temperature, "top_p": settings.top_p,
                     "samples_per_prompt": settings.replies_per_prompt},
        "examples": {kind: [{"prompt": prompts[kind][i][0][-1]["content"], "reply": replies[kind][i][0]}
                            for i in range(min(3, len(replies[kind])))] for kind in KINDS},
    }


@task("toyworld")
def toyworld_task(ctx: EvalContext) -> dict:
    """Oracle helpfulness, violation rate (by category and vector) and false refusals on toy-world prompts."""
    settings = ToyEvalSettings(prompts=ctx.limit or ToyEvalSettings.prompts, seed=ctx.seed,
                               batch_size=ctx.batch_size, temperature=float(ctx.options.get("temperature", 0)),
                               top_p=float(ctx.options.get("top_p", ToyEvalSettings.top_p)),
                               samples_per_prompt=int(ctx.options.get("samples", 1)))
    return oracle_evaluation(ctx.llm, ToyWorld(int(ctx.options.get("world_seed", 0))), settings, ctx.data)
