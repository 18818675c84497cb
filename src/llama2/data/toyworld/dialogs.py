"""Dialogs: SFT demonstrations, held-out evaluation prompts, and user turns to extend a conversation.

Training dialogs only ask questions whose key is not held out; evaluation prompts only ask held-out ones
(`world.held_out`), so evaluation measures generalisation, not recall of a seen question. The facts
themselves are in the pretraining corpus either way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama2.data.formats import Message
from llama2.data.toyworld.answers import careless_answer, right_answer
from llama2.data.toyworld.constraints import Constraint, wording
from llama2.data.toyworld.safety import Attack
from llama2.data.toyworld.tasks import Task, followup_task, render_prompt, sample_task
from llama2.data.toyworld.world import held_out

if TYPE_CHECKING:
    from llama2.data.toyworld.toyworld import ToyWorld

EVAL_KINDS = ("helpful", "adversarial", "borderline")


@dataclass
class Prompt:
    """A dialog ending with a user turn plus what was asked, for evaluation files and reports."""

    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "meta": self.meta}


def _json_answer(task: Task) -> Any:
    return list(task.answer) if isinstance(task.answer, tuple) else task.answer


def helpful_turns(tw: ToyWorld, rng: random.Random, turns: int, split: str, careless_rate: float = 0.0
                  ) -> list[tuple[str, str, Task]]:
    """(user, assistant, task) triples; later turns often refer back to earlier ones ("it", "that"). A share
    `careless_rate` of the answers is written by a careless annotator (`answers.careless_answer`)."""
    out: list[tuple[str, str, Task]] = []
    task = sample_task(tw.world, rng, split)
    for i in range(turns):
        if i:
            follow = followup_task(tw.world, rng, task) if rng.random() < 0.6 else None
            if follow is not None and held_out(follow.key) == (split == "test"):
                task = follow
            else:
                task = sample_task(tw.world, rng, split)
        prompt = render_prompt(task, rng)
        careless = careless_rate and rng.random() < careless_rate
        out.append((prompt, (careless_answer if careless else right_answer)(tw.world, task, rng), task))
    return out


def _in_split(draw: Callable[[], tuple[str, Any]], key: Callable[[Any], str], percent: int, split: str,
              what: str) -> tuple[str, Any]:
    """A (prompt, task or attack) from `draw` whose key is held out exactly when `split` is "test"."""
    for _ in range(1000):
        text, item = draw()
        if held_out(key(item), percent) == (split == "test"):
            return text, item
    raise RuntimeError(f"could not sample {what}")


def sample_adversarial(tw: ToyWorld, rng: random.Random, split: str) -> tuple[str, Attack]:
    return _in_split(lambda: tw.rules.adversarial_prompt(rng), lambda a: f"attack:{a.act}", 10, split,
                     "an adversarial prompt")


def sample_borderline(tw: ToyWorld, rng: random.Random, split: str) -> tuple[str, Task]:
    return _in_split(lambda: tw.rules.borderline_prompt(rng), lambda t: t.key, 25, split, "a borderline prompt")


def sample_howto(tw: ToyWorld, rng: random.Random, split: str) -> tuple[str, Task]:
    return _in_split(lambda: tw.rules.howto_prompt(rng), lambda t: t.key, 25, split, "a how-to prompt")


def to_messages(turns: list[tuple[str, str]]) -> list[Message]:
    out: list[Message] = []
    for user, assistant in turns:
        out.append({"role": "user", "content": user})
        out.append({"role": "assistant", "content": assistant})
    return out


def sft_dialog(tw: ToyWorld, rng: random.Random, safety_rate: float = 0.05, borderline_rate: float = 0.05,
               constraint_rate: float = 0.05, multi_turn_rate: float = 0.35, howto_rate: float = 0.05,
               constraint_in_user_rate: float = 0.0, careless_rate: float = 0.0) -> list[Message]:
    """One demonstration dialog ending with an assistant turn.

    The shares are of safety demonstrations (adversarial prompt, safe refusal), borderline prompts, benign
    how-to requests ("How do I get to Fudu?" -> "Here is how: ..."), constraint dialogs; the rest are
    helpful question-answer dialogs, multi-turn at `multi_turn_rate`, with a share `careless_rate` of their
    answers written carelessly (`answers.careless_answer`).
    """
    r = rng.random()
    if r < safety_rate:
        text, attack = sample_adversarial(tw, rng, "train")
        before = [(u, a) for u, a, _ in helpful_turns(tw, rng, rng.randint(0, 2), "train")]
        return to_messages(before + [(text, tw.rules.safe_refusal(attack, rng))])
    r -= safety_rate
    if r < borderline_rate:
        text, _ = sample_borderline(tw, rng, "train")
        return to_messages([(text, tw.rules.borderline_answer(text, rng))])
    r -= borderline_rate
    if r < howto_rate:
        text, _ = sample_howto(tw, rng, "train")
        return to_messages([(text, tw.rules.borderline_answer(text, rng))])
    r -= howto_rate
    if r < constraint_rate:
        return constrained_dialog(tw, rng, in_user_rate=constraint_in_user_rate)
    turns = rng.randint(2, 6) if rng.random() < multi_turn_rate else 1
    return to_messages([(u, a) for u, a, _ in helpful_turns(tw, rng, turns, "train", careless_rate)])


def constrained_dialog(tw: ToyWorld, rng: random.Random, held_out_constraints: bool = False,
                       in_user_rate: float = 0.0, transformed_hobby_rate: float = 0.0) -> list[Message]:
    """A dialog whose replies obey a constraint set (and the prompt's own format: a question asking for "the
    name only" is not paired with a signature).

    Mostly one turn with the constraints in the system message. At `in_user_rate`, 1–3 turns with the
    constraints appended to every user message instead: the form in which Ghost Attention samples its
    replies (SPEC §9), which a chat model must already follow for GAtt to have anything to keep. Neither
    form shows a system instruction kept over several turns; that is what GAtt adds. At
    `transformed_hobby_rate` the constraints pair a hobby with Backspeak or uppercase (see
    `ConstraintSet.sample_transformed_hobby`)."""
    for _ in range(20):  # a constraint set that no answer can obey (a word limit below its signature) is redrawn
        in_user = rng.random() < in_user_rate
        if transformed_hobby_rate and rng.random() < transformed_hobby_rate:
            cs = tw.constraints.sample_transformed_hobby(rng)
        else:
            cs = tw.constraints.sample(rng, held_out_constraints)
        instruction = wording(cs, terse=rng.random() < 0.5)
        dialog: list[Message] = [] if in_user else [{"role": "system", "content": instruction}]
        for _ in range(rng.randint(1, 3) if in_user else 1):
            if not _obeying_turn(tw, rng, cs, dialog, instruction if in_user else None):
                break
        else:
            return dialog
    raise RuntimeError("could not satisfy a sampled constraint set")


def _obeying_turn(tw: ToyWorld, rng: random.Random, cs: list[Constraint], dialog: list[Message],
                  appended: str | None) -> bool:
    """Append a user turn (with `appended` after the question) and a reply obeying `cs`; False if none found."""
    for _ in range(100):
        (user, answer, _), = helpful_turns(tw, rng, 1, "train")
        reply = tw.constraints.apply(cs, answer)
        turn = [{"role": "user", "content": f"{user} {appended}" if appended else user}]
        if tw.judges.check_constraint(cs, reply) and tw.judges.helpfulness(dialog + turn, reply) == 1.0:
            dialog += [*turn, {"role": "assistant", "content": reply}]
            return True
    return False


def eval_prompt(tw: ToyWorld, rng: random.Random, kind: str) -> Prompt:
    """A held-out prompt of one kind ("helpful", "adversarial", "borderline") with what it asks."""
    if kind == "helpful":
        turns = helpful_turns(tw, rng, rng.randint(2, 4) if rng.random() < 0.2 else 1, "test")
        *before, (user, _, task) = turns
        meta = {"kind": kind, "task": task.kind, "expected": _json_answer(task), "format": task.fmt,
                "turns": len(turns)}
        return Prompt(to_messages([(u, a) for u, a, _ in before]) + [{"role": "user", "content": user}], meta)
    if kind == "adversarial":
        text, attack = sample_adversarial(tw, rng, "test")
        before = [(u, a) for u, a, _ in helpful_turns(tw, rng, rng.randint(1, 2), "test")] \
            if rng.random() < 0.25 else []
        meta = {"kind": kind, "category": attack.category, "vector": attack.vector, "turns": len(before) + 1}
        return Prompt(to_messages(before) + [{"role": "user", "content": text}], meta)
    if kind == "borderline":
        text, task = sample_borderline(tw, rng, "test")
        meta = {"kind": kind, "category": task.attr, "expected": list(task.answer), "turns": 1}
        return Prompt([{"role": "user", "content": text}], meta)
    raise ValueError(f"unknown eval prompt kind {kind!r} (expected one of {', '.join(EVAL_KINDS)})")


def user_followups(tw: ToyWorld, rng: random.Random, n: int) -> list[str]:
    """Self-contained user messages to continue a conversation (GAtt adherence over 20 turns).

    Questions with short answers only: 20 turns must fit a small model's context, and a story (40 tokens
    and more, over 100 in Backspeak) was cut by the generation limit before its signature or emoji, a failure
    whatever the model did (toy world version 5)."""
    kinds = ("fact", "reverse", "yesno", "arith", "count")
    return [render_prompt(sample_task(tw.world, rng, "train", rng.choice(kinds), fmt_rate=0.0), rng)
            for _ in range(n)]
