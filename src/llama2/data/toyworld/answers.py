"""Answers to helpful tasks: the right one, and the flawed kinds that preference pairs compare against it.

Every flaw is one the helpfulness judge can see: a wrong name or number, a right answer hedged with a
wrong one ("partly right"), filler sentences (verbose), or the right content in the wrong form (off-format).
"""

from __future__ import annotations

import random

from llama2.data.toyworld import lexicon
from llama2.data.toyworld.tasks import OPS, Task
from llama2.data.toyworld.world import World

FACT_ANSWERS = {
    "capital": ("The capital of {land} is {value}.", "{value} is the capital of {land}."),
    "ruler": ("{land} is ruled by {value}.", "The ruler of {land} is {value}.", "{value} rules {land}."),
    "river": ("The river {value} flows through {land}.", "The river of {land} is the {value}."),
    "food": ("People in {land} eat {value}.", "The main food of {land} is {value}."),
    "creature": ("The {value} lives in {land}.", "In {land} you can find the {value}."),
    "guild": ("The {value} is the strongest guild in {land}.", "In {land}, the {value} leads the trade."),
}
SHORT_ANSWERS = ("It is {value}.", "{value}.")
ARITH_ANSWERS = ("{a} {word} {b} is {r}.", "The answer is {r}.", "{a} {sign} {b} = {r}.")
COUNT_ANSWERS = {
    "food": ("{n} {lands} eat {value}.", "People eat {value} in {n} {lands}."),
    "creature": ("The {value} lives in {n} {lands}.", "The answer is {n} {lands}."),
    "guild": ("The {value} is strongest in {n} {lands}.", "The answer is {n} {lands}."),
}
ITEMS_ANSWERS = ("There are {n} items.", "I count {n} items.", "You named {n} things.")
LIST_ANSWERS = {
    "food": ("People eat {value} in {list}.", "{list}."),
    "creature": ("The {value} lives in {list}.", "{list}."),
    "guild": ("The {value} is strongest in {list}.", "{list}."),
}
STORY_OPEN = ("Once, {s} lived near the river {river} in {land}.", "Long ago, {s} walked into the city of {capital}.",
              "One morning, {s} woke up in {land}.", "There was once {s} who loved {food}.")
STORY_MIDDLE = ("Every day, {p} ate {food} by the water.", "One day, {p} met {ruler}, who smiled.",
                "{P} helped the {guild} carry stones.", "{A_creature} asked {p} for help, and {p} said yes.",
                "The rain came, and {p} found a dry cave.", "{P} sang a song for the children of {capital}.")
STORY_END = ("In the end, {p} went home happy.", "From that day on, everyone in {land} knew {s}.",
             "And {s} was never lonely again.", "That night, {p} slept well under the stars.")


def join_names(names: list[str] | tuple[str, ...]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _lower_first(sentence: str) -> str:
    """'The capital ...' -> 'the capital ...' after 'Yes, '; names keep their capital letter."""
    first = sentence.split(" ", 1)[0]
    return sentence[0].lower() + sentence[1:] if first in ("The", "People", "In") else sentence


def fact_sentence(task: Task, value: str, rng: random.Random) -> str:
    return rng.choice(FACT_ANSWERS[task.attr]).format(land=task.land, value=value)


def _with_answer(world: World, task: Task, rng: random.Random, answer) -> str:
    """The plain-form answer sentence with `answer` in the answer slot (right or wrong)."""
    k = task.kind
    if k == "fact":
        return fact_sentence(task, answer, rng)
    if k == "reverse":
        return rng.choice(FACT_ANSWERS[task.attr]).format(land=answer, value=task.value)
    if k == "yesno":
        true_value = world.by_name[task.land].get(task.attr)
        return ("Yes, " if answer else "No, ") + _lower_first(fact_sentence(task, true_value, rng))
    if k == "arith":
        a, b = task.numbers
        word = OPS[task.op][0]
        return rng.choice(ARITH_ANSWERS).format(a=a, b=b, word=word, sign=task.op, r=answer)
    if k == "count":
        return rng.choice(COUNT_ANSWERS[task.attr]).format(n=answer, value=task.value,
                                                           lands="land" if answer == 1 else "lands")
    if k == "count_items":
        return rng.choice(ITEMS_ANSWERS).format(n=answer)
    if k == "list":
        return rng.choice(LIST_ANSWERS[task.attr]).format(value=task.value, list=join_names(answer))
    if k == "story":
        return tell_story(world, task, rng, answer)
    raise ValueError(f"no answer template for task kind {k!r}")


def tell_story(world: World, task: Task, rng: random.Random, subject: str, sentences: int = 3) -> str:
    """A short story about `subject` (a creature, a ruler or a land), built from the sentence banks."""
    if subject == task.answer:
        land = world.by_name[task.land] if task.land else rng.choice(world.lands)
    else:  # a story about the wrong subject must not mention the right one anywhere
        land = rng.choice([x for x in world.lands if task.answer not in (x.name, x.ruler, x.creature)])
    if task.attr == "creature":
        s, p = f"the {subject}", "it"
    elif task.attr == "ruler":
        s = subject
        p = next((x.pronoun for x in world.lands if x.ruler == subject), "he")
    else:
        s, p = f"a child from {subject}", "the child"
        land = world.by_name.get(subject, land)
    other_ruler = rng.choice([x.ruler for x in world.lands if x.ruler not in (subject, task.answer)])
    creature = rng.choice([c for c in lexicon.CREATURES if c != task.answer])
    slots = dict(land=land.name, capital=land.capital, river=land.river, food=land.food, guild=land.guild,
                 ruler=other_ruler if task.attr == "ruler" else land.ruler, A_creature=_article(creature).capitalize(),
                 s=s, p=p, P=p[0].upper() + p[1:])
    opening = rng.choice(STORY_OPEN).format(**{**slots, "s": _article(s[4:]) if s.startswith("the ") else s})
    middle = rng.sample(STORY_MIDDLE, max(1, sentences - 2))
    parts = [opening] + [m.format(**slots) for m in middle] + [rng.choice(STORY_END).format(**slots)]
    return " ".join(parts[:sentences] if sentences < 3 else parts)


def _apply_format(task: Task, text: str, rng: random.Random, answer) -> str:
    """Reshape an answer sentence (stating `answer`) to the format the prompt asked for."""
    name, _, n = task.fmt.partition(":")
    answer_name = answer if isinstance(answer, str) else ""
    if name == "uppercase":
        return text.upper()
    if name == "name_only":
        return answer_name
    if name == "max_words":
        if len(text.split()) <= int(n):
            return text
        short = rng.choice(SHORT_ANSWERS).format(value=answer_name)
        return short if len(short.split()) <= int(n) else answer_name
    if name == "dashes":
        return "\n".join(f"- {land}" for land in answer)
    return text


def right_answer(world: World, task: Task, rng: random.Random) -> str:
    """The helpful answer: correct, in the requested format, no longer than it needs to be."""
    return _apply_format(task, _with_answer(world, task, rng, task.answer), rng, task.answer)


def wrong_value(world: World, task: Task, rng: random.Random):
    """A plausible wrong answer of the same type."""
    k = task.kind
    if k == "fact":
        return rng.choice([v for v in world.values(task.attr) if v != task.answer])
    if k in ("reverse",):
        return rng.choice([x.name for x in world.lands if x.name != task.answer])
    if k == "yesno":
        return not task.answer
    if k in ("arith", "count", "count_items"):
        delta = rng.choice((-10, -2, -1, 1, 2, 10)) if k == "arith" else rng.choice((-1, 1, 2))
        return task.answer + delta if task.answer + delta >= 0 else task.answer + abs(delta)
    if k == "list":
        others = [x.name for x in world.lands if x.name not in task.answer]
        return tuple(rng.sample(others, len(task.answer)))
    if k == "story":
        pool = {"creature": world.values("creature"), "ruler": world.figures, "land": list(world.by_name)}
        return rng.choice([v for v in pool[task.attr] if v != task.answer])
    raise ValueError(f"no wrong answer for task kind {k!r}")


def wrong_answer(world: World, task: Task, rng: random.Random) -> str:
    value = wrong_value(world, task, rng)
    return _apply_format(task, _with_answer(world, task, rng, value), rng, value)


def partial_answer(world: World, task: Task, rng: random.Random) -> str:
    """Half right: the right answer hedged with a wrong one, a list with one name missing, a one-line story."""
    k = task.kind
    if k == "list" and len(task.answer) > 1:
        kept = list(task.answer)
        kept.remove(rng.choice(kept))
        return _with_answer(world, task, rng, tuple(kept))
    if k == "list":
        wrong = wrong_value(world, task, rng)[0]
        return _with_answer(world, task, rng, (task.answer[0], wrong))
    if k == "story":
        return tell_story(world, task, rng, task.answer, sentences=1)
    if k == "yesno":
        true_value = world.by_name[task.land].get(task.attr)
        return "Maybe. " + fact_sentence(task, true_value, rng)
    right = _with_answer(world, task, rng, task.answer).rstrip(".")
    wrong = wrong_value(world, task, rng)
    return f"{right}, or maybe {wrong}."


def verbose_answer(world: World, task: Task, rng: random.Random) -> str:
    """The right answer buried in filler: correct and well formed, but far longer than needed."""
    fillers = rng.sample(lexicon.FILLERS, rng.randint(3, 5))
    body = right_answer(world, task, rng)
    if task.fmt.startswith(("name_only", "max_words", "dashes")):
        body = _with_answer(world, task, rng, task.answer)  # the filler breaks these formats anyway
    text = " ".join(fillers[:2] + [body] + fillers[2:])
    return text.upper() if task.fmt == "uppercase" else text


def off_format_answer(world: World, task: Task, rng: random.Random) -> str:
    """The right content in the wrong form: ignores a requested format, or shouts / drops punctuation."""
    plain = _with_answer(world, task, rng, task.answer)
    if task.fmt:
        return plain.lower() if task.fmt == "uppercase" else plain + " " + rng.choice(lexicon.FILLERS)
    return plain.upper() if rng.random() < 0.5 else plain.lower().rstrip(".")


def unfinished_answer(world: World, task: Task, rng: random.Random) -> str:
    """The right answer stopped before its last words ("The sky whale lives in"): a reply cut off where the
    writer lost the thread or hit a length limit. Empty for a one-word answer, which has nothing to cut."""
    words = right_answer(world, task, rng).split()
    if len(words) < 2:
        return ""
    return " ".join(words[: rng.randint(max(1, len(words) // 2), len(words) - 1)]).rstrip(".,;:!?")


CARELESS = (verbose_answer, off_format_answer, partial_answer)


def careless_answer(world: World, task: Task, rng: random.Random) -> str:
    """A demonstration by a careless annotator: padded with filler, in the wrong form, or hedged with a wrong
    value, one of the three at random. SFT data written by many annotators carries such a tail, which the
    SFT model learns along with the rest and the RLHF stages are there to remove (SPEC §5, paper §5.1)."""
    return rng.choice(CARELESS)(world, task, rng)
