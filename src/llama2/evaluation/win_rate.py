"""Win rate of one chat model over another on a prompt set, as judged by a scoring function.

The paper's helpfulness comparisons [P §3.4.2] are pairwise: each prompt gets a reply from both models and a
judge prefers one or calls a tie. Here the judge is anything that scores a reply to a dialog: the toy world's
oracle (`oracle:helpfulness`, `oracle:safety`) or, once the reward-model stage provides a loader, a reward model.
A tie counts as half a win, so identical models score exactly 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from llama2.data.formats import read_chat
from llama2.evaluation.options import float_option, int_option, required_option
from llama2.evaluation.paths import task_data
from llama2.evaluation.registry import EvalContext, task
from llama2.evaluation.scoring import sample_indices, win_rate
from llama2.tokenizer.chat_format import Dialog, Message


class Judge(Protocol):
    def score(self, dialog: Sequence[Message], response: str) -> float:
        """Higher is better; only the order of the two replies' scores matters."""
        ...


@dataclass(frozen=True)
class FunctionJudge:
    """Turns any `(dialog, response) -> float` callable, e.g. `ToyWorld.helpfulness`, into a `Judge`."""

    fn: Callable[[Sequence[Message], str], float]

    def score(self, dialog: Sequence[Message], response: str) -> float:
        return float(self.fn(dialog, response))


def as_judge(judge: Judge | Callable[[Sequence[Message], str], float]) -> Judge:
    return judge if hasattr(judge, "score") else FunctionJudge(judge)


def oracle_judge(spec: str, ctx: EvalContext) -> Judge:
    """`oracle:helpfulness` or `oracle:safety` of the toy world built with `--option world_seed=N` (default 0),
    which must be the seed that generated the prompts."""
    from llama2.data.toyworld import ToyWorld

    if spec not in ("helpfulness", "safety"):
        raise ValueError(f"oracle judge must be oracle:helpfulness or oracle:safety, got oracle:{spec}")
    world = ToyWorld(seed=int_option(ctx, "world_seed", 0))
    return FunctionJudge(getattr(world, spec))


JUDGE_KINDS: dict[str, Callable[[str, EvalContext], Judge]] = {"oracle": oracle_judge}
"""`--option judge=KIND:SPEC` makers. A reward-model judge (`rm:DIR`) is to be added with the RM loader."""


def load_judge(spec: str, ctx: EvalContext) -> Judge:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in JUDGE_KINDS:
        raise ValueError(f"unknown judge {spec!r}; known kinds: {', '.join(f'{k}:...' for k in JUDGE_KINDS)}")
    return JUDGE_KINDS[kind](rest, ctx)


def prompt_dialog(messages: Sequence[Message]) -> list[Message]:
    """The dialog up to its last user turn, so SFT files (ending with a reply) serve as prompt sets too."""
    dialog = list(messages)
    while dialog and dialog[-1]["role"] == "assistant":
        dialog.pop()
    if not dialog:
        raise ValueError("a prompt record has no user turn")
    return dialog


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: int = 256
    seed: int = 0


def chat_replies(llm, dialogs: Sequence[Dialog], sampling: Sampling, batch_size: int, desc: str) -> list[str]:
    """Replies in dialog order. Dialogs are batched by text length, because a batch decodes from its shortest
    prompt to its longest plus `max_gen_len`; the batches and their seeds (`sampling.seed + k` for batch k)
    depend only on the text, so two models with different tokenizers still draw the same way."""
    order = sorted(range(len(dialogs)), key=lambda i: sum(len(m["content"]) for m in dialogs[i]))
    replies = [""] * len(dialogs)
    for k, start in enumerate(tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False)):
        batch = order[start : start + batch_size]
        out = llm.chat_completion([dialogs[i] for i in batch], sampling.temperature, sampling.top_p,
                                  sampling.max_gen_len, seed=sampling.seed + k)
        for i, r in zip(batch, out, strict=True):
            replies[i] = r["generation"]["content"]
    return replies


def compare(llm_a, llm_b, dialogs: Sequence[Dialog], judge: Judge | Callable[[Sequence[Message], str], float],
            sampling: Sampling, batch_size: int = 16) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(win-rate summary of A over B, one record per prompt with both replies and scores)."""
    judge = as_judge(judge)
    replies_a = chat_replies(llm_a, dialogs, sampling, batch_size, "win_rate: model")
    replies_b = chat_replies(llm_b, dialogs, sampling, batch_size, "win_rate: baseline")
    scores_a = [judge.score(d, r) for d, r in zip(dialogs, replies_a, strict=True)]
    scores_b = [judge.score(d, r) for d, r in zip(dialogs, replies_b, strict=True)]
    records = [{"dialog": d, "reply": ra, "baseline_reply": rb, "score": sa, "baseline_score": sb}
               for d, ra, rb, sa, sb in zip(dialogs, replies_a, replies_b, scores_a, scores_b, strict=True)]
    return win_rate(scores_a, scores_b), records


@task("win_rate")
def win_rate_task(ctx: EvalContext) -> dict[str, Any]:
    """Win rate of --model over --option baseline=DIR on --data chat prompts, --option judge=oracle:helpfulness."""
    from llama2.generation.llama import Llama

    baseline_dir = required_option(ctx, "baseline", "the checkpoint directory of the model to compare against")
    judge_spec = required_option(ctx, "judge", "oracle:helpfulness, oracle:safety")
    judge = load_judge(judge_spec, ctx)
    if ctx.data is None:
        raise ValueError("win_rate needs --data: a chat jsonl of prompts ({'messages': [...]} a line)")
    records = read_chat(task_data(ctx.data))
    dialogs = [prompt_dialog(records[i].messages) for i in sample_indices(len(records), ctx.limit, ctx.seed)]
    sampling = Sampling(float_option(ctx, "temperature", 0.6), float_option(ctx, "top_p", 0.9),
                        int_option(ctx, "max_gen_len", 256), ctx.seed)
    baseline = Llama.load(baseline_dir, device=ctx.llm.device)
    summary, per_prompt = compare(ctx.llm, baseline, dialogs, judge, sampling, ctx.batch_size)
    if ctx.out_dir is not None:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with (ctx.out_dir / "win_rate.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt)
    return {**summary, "n": len(dialogs), "judge": judge_spec, "baseline": baseline_dir}
