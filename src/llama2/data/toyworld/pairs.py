"""Preference pairs (SPEC §6): candidates of varied quality, oracle ratings, annotator-style noise.

For each prompt the candidate generator writes responses of known kinds (right, wrong, partly right,
verbose, off-format, unfinished, needless refusal; for adversarial prompts safe refusals of several qualities and unsafe
compliance, plain or padded with the same filler as a verbose refusal, so that filler does not mark a reply
as safe). The oracle scores them (helpfulness judge for the helpfulness set, safety judge for the safety
set); the better-scored one is chosen and the **rating level** comes from the score gap:

    gap >= 0.5: significantly_better   gap >= 0.25: better   gap >= 0.1: slightly_better   else: negligibly_better

The level mix is steered to SPEC §6's shape (about a third "negligibly better", 10-20% "significantly
better") by drawing a target level per pair and picking a candidate pair with that gap. Then, like a human
annotator, the label flips with probability `0.5 * exp(-gap / 0.08)`: a coin toss when the two responses are
equally good (0.5 at gap 0), 14% at gap 0.1, 2% at 0.25, under 0.1% beyond 0.5. The rating keeps the level
the annotator perceived. Safety pairs carry the 3-bin label (chosen safe / rejected unsafe, both safe, both
unsafe, steered to 18/47/35%); a flip that would put an unsafe response over a safe one is dropped, as the
paper excludes such pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from llama2.data.formats import Message, PreferenceRecord, SafetyLabel
from llama2.data.toyworld import answers, lexicon
from llama2.data.toyworld.dialogs import helpful_turns, sample_adversarial, sample_borderline, to_messages
from llama2.data.toyworld.judges import SAFE_THRESHOLD
from llama2.data.toyworld.safety import OPENER_ONLY
from llama2.data.toyworld.tasks import sample_task

if TYPE_CHECKING:
    from llama2.data.toyworld.toyworld import ToyWorld

PAIR_KINDS = ("helpfulness", "safety")
LEVELS = ("significantly_better", "better", "slightly_better", "negligibly_better")
HELPFUL_LEVEL_MIX = (0.15, 0.25, 0.27, 0.33)
SAFETY_BIN_MIX = {"safe_unsafe": 0.18, "both_safe": 0.47, "both_unsafe": 0.35}
SAFETY_LEVEL_MIX = {"safe_unsafe": (0.6, 0.4, 0.0, 0.0), "both_safe": (0.05, 0.25, 0.35, 0.35),
                    "both_unsafe": (0.0, 0.0, 0.4, 0.6)}
T = TypeVar("T")
NEEDLESS_REFUSALS = ("I'm sorry, but I can't help with that.",
                     "I can't answer that because it might be unsafe. Instead, ask me something else.",
                     "I won't answer questions like this.")


@dataclass(frozen=True)
class Candidate:
    kind: str  # right, wrong, partly_right, verbose, off_format, unfinished, needless_refusal, safe_refusal, ...
    text: str


def rating_level(gap: float) -> str:
    gap = abs(gap)
    return LEVELS[0] if gap >= 0.5 else LEVELS[1] if gap >= 0.25 else LEVELS[2] if gap >= 0.1 else LEVELS[3]


def flip_probability(gap: float) -> float:
    """Chance that a simulated annotator prefers the worse response (documented in the module docstring)."""
    return 0.5 * math.exp(-abs(gap) / 0.08)


def candidates(tw: ToyWorld, dialog: list[Message], rng: random.Random) -> list[Candidate]:
    """Responses of varied quality to the last user turn of `dialog`."""
    info = tw.judges.analyze(dialog)
    out: list[Candidate] = []
    if info.attack is not None:
        a, rules = info.attack, tw.rules
        for _ in range(2):
            out.append(Candidate("safe_refusal", rules.safe_refusal(a, rng)))
            out.append(Candidate("unsafe_compliance", rules.compliance(a, rng)))
        out += [Candidate("explained_refusal", rules.safe_refusal(a, rng, redirect=False)),
                Candidate("redirected_refusal", rules.safe_refusal(a, rng, explain=False)),
                Candidate("bare_refusal", rules.safe_refusal(a, rng, explain=False, redirect=False)),
                Candidate("verbose_refusal", " ".join([rules.safe_refusal(a, rng)] +
                                                      rng.sample(lexicon.FILLERS, 4))),
                Candidate("verbose_compliance", " ".join([rules.compliance(a, rng)] +
                                                         rng.sample(lexicon.FILLERS, 3))),
                Candidate("unsafe_opener", rng.choice(OPENER_ONLY)),
                Candidate("off_topic", answers.right_answer(tw.world, sample_task(tw.world, rng), rng))]
        return out
    task = info.task
    if task is None:
        raise ValueError(f"no task recognised in the dialog's last turn: {dialog[-1]['content']!r}")
    if task.kind in ("borderline", "howto"):
        text = dialog[-1]["content"]
        out += [Candidate("right", tw.rules.borderline_answer(text, rng)) for _ in range(2)]
        out.append(Candidate("verbose", " ".join([tw.rules.borderline_answer(text, rng)] +
                                                 rng.sample(lexicon.FILLERS, 3))))
    else:
        w = tw.world
        out += [Candidate("right", answers.right_answer(w, task, rng)) for _ in range(2)]
        out += [Candidate("wrong", answers.wrong_answer(w, task, rng)),
                Candidate("wrong", answers.wrong_answer(w, task, rng)),
                Candidate("partly_right", answers.partial_answer(w, task, rng)),
                Candidate("verbose", answers.verbose_answer(w, task, rng)),
                Candidate("off_format", answers.off_format_answer(w, task, rng))]
        # A reply that stops before its answer is worse than any finished one: without such pairs the
        # likelihood-gated helpfulness RM scored "The sky whale lives in" above "... in 2 lands." (it skips
        # the surprise of an uncertain number), and PPO doubled the share of cut replies (runs/demo29)
        unfinished = answers.unfinished_answer(w, task, rng)
        out += [Candidate("unfinished", unfinished)] if unfinished else []
    out += [Candidate("needless_refusal", rng.choice(NEEDLESS_REFUSALS))]
    return out


def pair_prompt(tw: ToyWorld, kind: str, rng: random.Random, split: str) -> list[Message]:
    """A prompt dialog of a preference pair: a helpful task (sometimes borderline) for the helpfulness set,
    adversarial or borderline for the safety set, after up to three earlier turns."""
    context = [(u, a) for u, a, _ in helpful_turns(tw, rng, rng.choice((0, 0, 0, 1, 2)), split)] \
        if rng.random() < 0.4 else []
    r = rng.random()
    if kind == "helpfulness" and r < 0.9:
        *before, (user, _, _) = helpful_turns(tw, rng, rng.randint(1, 3), split)
        return to_messages(context + [(u, a) for u, a, _ in before]) + [{"role": "user", "content": user}]
    if kind == "helpfulness" or r < 0.2:
        text, _ = sample_borderline(tw, rng, split)
    else:
        text, _ = sample_adversarial(tw, rng, split)
    return to_messages(context) + [{"role": "user", "content": text}]


def annotator_order(x: tuple[float, T], y: tuple[float, T], rng: random.Random) -> tuple[tuple[float, T], ...]:
    """(chosen, rejected) of two (oracle score, response) as the simulated annotator ranks them: the better
    one first (a coin toss on a tie), then flipped with `flip_probability` of the gap."""
    if y[0] > x[0] or (x[0] == y[0] and rng.random() < 0.5):
        x, y = y, x
    if rng.random() < flip_probability(x[0] - y[0]):
        x, y = y, x
    return x, y


def annotate_helpfulness(tw: ToyWorld, dialog: list[Message], a: str, b: str, rng: random.Random
                         ) -> PreferenceRecord | None:
    """A helpfulness pair of two given responses (e.g. a model's own samples), labelled like the templated
    pairs: oracle scores, the annotator's order and noise, the rating level of the gap. None when the two
    responses are the same or one is empty (nothing to compare)."""
    if a.strip() == b.strip() or not a.strip() or not b.strip():
        return None
    (sa, chosen), (sb, rejected) = annotator_order((tw.helpfulness(dialog, a), a), (tw.helpfulness(dialog, b), b), rng)
    return PreferenceRecord(dialog, chosen, rejected, rating_level(sa - sb), None)


def _bin(safe_a: bool, safe_b: bool) -> str:
    return "both_safe" if safe_a and safe_b else "both_unsafe" if not (safe_a or safe_b) else "safe_unsafe"


def preference_pair(tw: ToyWorld, kind: str, rng: random.Random, split: str) -> PreferenceRecord:
    """One labelled pair, steered towards the target level (and safety bin) mix."""
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown preference kind {kind!r} (expected one of {', '.join(PAIR_KINDS)})")
    if kind == "helpfulness":
        target_bin = None
        target = rng.choices(LEVELS, HELPFUL_LEVEL_MIX)[0]
    else:
        target_bin = rng.choices(tuple(SAFETY_BIN_MIX), tuple(SAFETY_BIN_MIX.values()))[0]
        target = rng.choices(LEVELS, SAFETY_LEVEL_MIX[target_bin])[0]
    score = tw.judges.helpfulness if kind == "helpfulness" else tw.judges.safety
    for _ in range(50):
        dialog = pair_prompt(tw, kind, rng, split)
        cands = list({c.text: c for c in candidates(tw, dialog, rng)}.values())
        scored = [(score(dialog, c.text), c) for c in cands]
        options = []
        for i in range(len(scored)):
            for j in range(i + 1, len(scored)):
                (sa, a), (sb, b) = scored[i], scored[j]
                if rating_level(sa - sb) != target:
                    continue
                if target_bin and _bin(sa >= SAFE_THRESHOLD, sb >= SAFE_THRESHOLD) != target_bin:
                    continue
                options.append(((sa, a), (sb, b)))
        if not options:
            continue
        (sa, a), (sb, b) = annotator_order(*rng.choice(options), rng)
        safety = None
        if kind == "safety":
            safety = SafetyLabel(chosen_safe=sa >= SAFE_THRESHOLD, rejected_safe=sb >= SAFE_THRESHOLD)
            if safety["rejected_safe"] and not safety["chosen_safe"]:
                continue  # excluded, as in the paper
        return PreferenceRecord(dialog, a.text, b.text, rating_level(sa - sb), safety)
    raise RuntimeError(f"could not build a {kind} pair at level {target}")
