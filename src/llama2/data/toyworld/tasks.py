"""Helpful tasks: what a user can ask, how it is worded, and how a prompt text is parsed back into a task.

One template table serves both directions. `render_prompt` fills a template; `TaskParser` compiles every
template into a regex (slots become alternations of the world's names, or digit groups) and recovers the
`Task` from the text alone. That is how the judges work on any dialog, including model-written ones, without
a side channel: the prompt *is* the record. Follow-up turns ("And who rules it?", "Now add 12 to that.")
are resolved against the earlier user turns of the same dialog.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any

from llama2.data.toyworld import lexicon
from llama2.data.toyworld.world import SHARED_ATTRIBUTES, UNIQUE_ATTRIBUTES, World, held_out

KINDS = ("fact", "reverse", "yesno", "arith", "count", "count_items", "list", "story")
TRAIN_WEIGHTS = (0.28, 0.1, 0.12, 0.18, 0.07, 0.05, 0.08, 0.12)
OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}


@dataclass(frozen=True)
class Task:
    """One question with everything a judge needs to score an answer to it.

    `answer` is the expected content: a name (fact, reverse), a bool (yesno), an int (arith, count,
    count_items), a tuple of land names (list), the subject's name (story), or required keywords (borderline, howto).
    """

    kind: str
    answer: Any
    key: str  # stable identity of the question's content: decides the held-out split
    attr: str = ""
    land: str = ""  # the land the question is about: "it" and "there" in a follow-up refer to it
    value: str = ""  # the name given in the question (reverse, yesno, count, list, story subject phrase)
    numbers: tuple[int, ...] = ()
    op: str = ""
    items: tuple[str, ...] = ()
    fmt: str = ""  # "", "uppercase", "name_only", "max_words:N", "dashes"
    followup: bool = False  # worded as a reference to an earlier turn

    @property
    def budget(self) -> int:
        """Words a direct answer needs; the concision rule starts to bite beyond it."""
        return {"fact": 12, "reverse": 12, "yesno": 16, "arith": 10, "count": 10, "count_items": 8,
                "list": 6 + 2 * len(self.answer) if self.kind == "list" else 0, "story": 60,
                "borderline": 28, "howto": 28}[self.kind]


NOUNS = {"capital": "capital", "ruler": "ruler", "river": "river", "food": "main food",
         "creature": "creature", "guild": "strongest guild"}
FACT_GENERIC = ("What is the {noun} of {land}?", "Tell me the {noun} of {land}.", "Name the {noun} of {land}.",
                "Do you know the {noun} of {land}?", "I want to know the {noun} of {land}.")
FACT_SPECIFIC = {
    "capital": ("Which city is the capital of {land}?", "What city does {land} call its capital?"),
    "ruler": ("Who rules {land}?", "Who is the ruler of {land}?"),
    "river": ("Which river flows through {land}?", "What river runs through {land}?"),
    "food": ("What do people eat in {land}?", "What food do people in {land} love?"),
    "creature": ("What creature lives in {land}?", "Which animal lives in {land}?"),
    "guild": ("Which guild is strongest in {land}?", "What guild leads the trade in {land}?"),
}
FACT_FOLLOWUPS = ("And what is its {noun}?", "What is the {noun} there?", "And the {noun}?",
                  "What about its {noun}?")
FACT_FOLLOWUPS_SPECIFIC = {
    "capital": ("Which city is its capital?",), "ruler": ("And who rules it?",),
    "river": ("Which river flows there?",), "food": ("What do people eat there?",),
    "creature": ("What creature lives there?",), "guild": ("Which guild is strongest there?",),
}
REVERSE = {
    "capital": ("Which land has the capital {value}?", "{value} is the capital of which land?",
                "In which land is the city {value}?"),
    "ruler": ("Which land does {value} rule?", "Where does {value} rule?"),
    "river": ("Which land does the river {value} flow through?", "Where does the river {value} flow?"),
}
YESNO = {
    "capital": ("Is {value} the capital of {land}?",),
    "ruler": ("Does {value} rule {land}?", "Is {land} ruled by {value}?"),
    "river": ("Does the river {value} flow through {land}?",),
    "food": ("Do people in {land} eat {value}?",),
    "creature": ("Does the {value} live in {land}?",),
    "guild": ("Is the {value} the strongest guild in {land}?",),
}
ARITH = {
    "+": ("What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} and {b}?",
          "Compute {a} + {b}.", "What is the sum of {a} and {b}?"),
    "-": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "Take {b} away from {a}."),
    "*": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
          "What is {a} multiplied by {b}?"),
}
ARITH_FOLLOWUPS = {"+": ("Now add {b} to that.", "Then add {b} to it."),
                   "-": ("Now subtract {b} from that.", "Then take {b} away from it."),
                   "*": ("Now multiply that by {b}.", "Then multiply it by {b}.")}
COUNT = {
    "food": ("How many lands eat {value}?", "In how many lands do people eat {value}?"),
    "creature": ("In how many lands does the {value} live?", "How many lands have the {value}?"),
    "guild": ("In how many lands is the {value} strongest?",),
}
COUNT_ITEMS = ("How many items are in this list: {items}?", "Count the items: {items}.",
               "How many things did I name: {items}?")
LIST = {
    "food": ("Which lands eat {value}?", "List the lands where people eat {value}.",
             "Name every land where people eat {value}."),
    "creature": ("Where does the {value} live?", "List the lands where the {value} lives."),
    "guild": ("List the lands where the {value} is strongest.", "In which lands is the {value} strongest?"),
}
STORY = ("Tell me a short story about {value}.", "Write a short story about {value}.", "Tell a story about {value}.",
         "Can you tell me a story about {value}?")
FORMATS = {
    "uppercase": ("Answer in capital letters: {q}", "{q} Please answer in capital letters."),
    "name_only": ("{q} Reply with the name only.", "{q} Give only the name."),
    "max_words": ("{q} Use at most {n} words.", "{q} Answer in {n} words or fewer."),
    "dashes": ("{q} Put each one on its own line after a dash.",),
}


# ------------------------------------------------------------------------------------------------ sampling


def _fmt_for(task: Task, rng: random.Random) -> str:
    if task.kind == "list":
        return rng.choice(("uppercase", "dashes"))
    if task.kind in ("fact", "reverse"):
        choice = rng.choice(("uppercase", "name_only", "max_words"))
        return f"max_words:{rng.choice((4, 6, 8))}" if choice == "max_words" else choice
    return ""


def make_task(world: World, rng: random.Random, kind: str) -> Task:
    """A random task of one kind (held-out status not checked: see `sample_task`)."""
    land = rng.choice(world.lands)
    if kind == "fact":
        attr = rng.choice(tuple(NOUNS))
        return Task(kind, land.get(attr), f"fact:{attr}:{land.name}", attr, land.name)
    if kind == "reverse":
        attr = rng.choice(UNIQUE_ATTRIBUTES)
        return Task(kind, land.name, f"reverse:{attr}:{land.name}", attr, land.name, land.get(attr))
    if kind == "yesno":
        attr = rng.choice(tuple(NOUNS))
        truth = rng.random() < 0.5
        value = land.get(attr) if truth else rng.choice([v for v in world.values(attr) if v != land.get(attr)])
        return Task(kind, truth, f"yesno:{attr}:{land.name}:{value}", attr, land.name, value)
    if kind == "arith":
        op = rng.choice(tuple(OPS))
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        return Task(kind, OPS[op][1](a, b), f"arith:{a}{op}{b}", numbers=(a, b), op=op)
    if kind in ("count", "list"):
        attr = rng.choice(SHARED_ATTRIBUTES)
        value = rng.choice(world.values(attr))
        lands = tuple(world.lands_with(attr, value))
        return Task(kind, len(lands) if kind == "count" else lands, f"{kind}:{attr}:{value}", attr, "", value)
    if kind == "count_items":
        pool = lexicon.FOODS + lexicon.CREATURES
        items = tuple(rng.sample(pool, rng.randint(2, 8)))
        return Task(kind, len(items), f"items:{','.join(items)}", items=items)
    if kind == "story":
        about = rng.choice(("creature", "ruler", "land"))
        if about == "creature":
            return Task(kind, land.creature, f"story:{land.creature}", "creature", "", f"the {land.creature}")
        if about == "ruler":
            return Task(kind, land.ruler, f"story:{land.ruler}", "ruler", land.name, land.ruler)
        return Task(kind, land.name, f"story:{land.name}", "land", land.name, land.name)
    raise ValueError(f"unknown task kind {kind!r} (expected one of {', '.join(KINDS)})")


def sample_task(world: World, rng: random.Random, split: str = "train", kind: str | None = None,
                fmt_rate: float = 0.15) -> Task:
    """A task whose key is in `split`: "train" never yields a held-out key, "test" only held-out keys."""
    for _ in range(1000):
        k = kind or rng.choices(KINDS, TRAIN_WEIGHTS)[0]
        task = make_task(world, rng, k)
        if held_out(task.key) == (split == "test"):
            if rng.random() < fmt_rate:
                task = replace(task, fmt=_fmt_for(task, rng))
            return task
    raise RuntimeError(f"could not sample a {split} task of kind {kind}")


def followup_task(world: World, rng: random.Random, previous: Task) -> Task | None:
    """A task worded as a reference to `previous` ("And who rules it?"), or None if it has no referent."""
    if previous.kind == "arith":
        op = rng.choice(tuple(OPS))
        a, b = previous.answer, rng.randint(2, 9) if op == "*" else rng.randint(10, 99)
        if op == "-" and b > a:
            op = "+"
        return Task("arith", OPS[op][1](a, b), f"arith:{a}{op}{b}", numbers=(a, b), op=op, followup=True)
    if previous.land:
        attr = rng.choice([a for a in NOUNS if not (previous.kind == "fact" and a == previous.attr)])
        land = world.by_name[previous.land]
        return Task("fact", land.get(attr), f"fact:{attr}:{land.name}", attr, land.name, followup=True)
    return None


# ----------------------------------------------------------------------------------------------- rendering


def templates_for(task: Task) -> tuple[str, ...]:
    k, attr = task.kind, task.attr
    if k == "fact":
        if task.followup:
            return tuple(t.replace("{noun}", NOUNS[attr]) for t in FACT_FOLLOWUPS) + FACT_FOLLOWUPS_SPECIFIC[attr]
        return tuple(t.replace("{noun}", NOUNS[attr]) for t in FACT_GENERIC) + FACT_SPECIFIC[attr]
    if k == "arith":
        return ARITH_FOLLOWUPS[task.op] if task.followup else ARITH[task.op]
    table = {"reverse": REVERSE, "yesno": YESNO, "count": COUNT, "list": LIST}
    if k in table:
        return table[k][attr]
    return {"count_items": COUNT_ITEMS, "story": STORY}[k]


def render_prompt(task: Task, rng: random.Random) -> str:
    a, b = (task.numbers + (0, 0))[:2]
    text = rng.choice(templates_for(task)).format(land=task.land, value=task.value, a=a, b=b,
                                                   items=", ".join(task.items))
    if task.fmt:
        name, _, n = task.fmt.partition(":")
        text = rng.choice(FORMATS[name]).format(q=text, n=n)
    return text


# ------------------------------------------------------------------------------------------------- parsing


class TaskParser:
    """Prompt text -> Task, by matching every template compiled to a regex. Cached: prompts repeat."""

    def __init__(self, world: World):
        self.world = world
        names = {attr: p.pattern for attr, p in world.value_patterns.items()}
        self._slot = {
            "land": f"(?P<land>{names['land']})", "a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)",
            "items": r"(?P<items>[a-z]+(?: [a-z]+)*(?:, [a-z]+(?: [a-z]+)*)+)",
        }
        self._rules: list[tuple[re.Pattern[str], Task]] = []
        for attr in NOUNS:
            self._add(Task("fact", None, "", attr), attr)
            self._add(Task("fact", None, "", attr, followup=True), attr)
            self._add(Task("yesno", None, "", attr), attr)
        for attr in UNIQUE_ATTRIBUTES:
            self._add(Task("reverse", None, "", attr), attr)
        for attr in SHARED_ATTRIBUTES:
            self._add(Task("count", None, "", attr), attr)
            self._add(Task("list", None, "", attr), attr)
        for op in OPS:
            self._add(Task("arith", None, "", op=op), "")
            self._add(Task("arith", None, "", op=op, followup=True), "")
        self._add(Task("count_items", None, ""), "")
        subject = "|".join(f"(?:{names[a]})" for a in ("creature", "ruler", "land"))
        self._slot["value_story"] = f"(?P<value>(?:the )?(?:{subject}))"
        self._add(Task("story", None, ""), "story")
        self._formats = [(re.compile("^" + re.escape(t).replace(re.escape("{q}"), "(?P<q>.+?)")
                                     .replace(re.escape("{n}"), r"(?P<n>\d+)") + "$", re.S), name)
                         for name, ts in FORMATS.items() for t in ts]
        self._cache: dict[tuple[str, str, int | None], Task | None] = {}

    def _add(self, proto: Task, attr: str) -> None:
        """Compile the templates of `proto`; `{value}` matches the names of `attr` ("story": any subject)."""
        if attr == "story":
            value = self._slot["value_story"]
        else:
            value = f"(?P<value>{self.world.value_patterns[attr].pattern})" if attr else ""
        for template in templates_for(proto):
            pattern = re.escape(template)
            for slot in ("land", "a", "b", "items"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), self._slot[slot])
            pattern = pattern.replace(re.escape("{value}"), value)
            self._rules.append((re.compile(f"^{pattern}$", re.IGNORECASE), proto))

    def parse(self, text: str, context_land: str = "", context_number: int | None = None) -> Task | None:
        """The task a user message asks, resolving follow-ups against the given context; None if unknown."""
        key = (text, context_land, context_number)
        if key not in self._cache:
            self._cache[key] = self._parse(text.strip(), context_land, context_number)
        return self._cache[key]

    def _parse(self, text: str, context_land: str, context_number: int | None) -> Task | None:
        fmt = ""
        for pattern, name in self._formats:
            m = pattern.match(text)
            if m:
                text, fmt = m.group("q").strip(), name + (f":{m.group('n')}" if "n" in m.groupdict() else "")
                break
        for pattern, proto in self._rules:
            m = pattern.match(text)
            if m:
                task = self._complete(proto, m, context_land, context_number)
                return replace(task, fmt=fmt) if task else None
        return None

    def _canon(self, attr: str, text: str) -> str:
        (value,) = self.world.find(attr, text)[:1] or (text,)
        return value

    def _complete(self, proto: Task, m: re.Match[str], context_land: str, context_number: int | None) -> Task | None:
        w, groups = self.world, m.groupdict()
        land = self._canon("land", groups["land"]) if groups.get("land") else context_land
        attr = proto.attr
        if proto.kind == "fact":
            if not land:
                return None
            return Task("fact", w.by_name[land].get(attr), f"fact:{attr}:{land}", attr, land, followup=proto.followup)
        if proto.kind == "yesno":
            value = self._canon(attr, groups["value"])
            return Task("yesno", w.by_name[land].get(attr) == value, f"yesno:{attr}:{land}:{value}", attr, land, value)
        if proto.kind == "reverse":
            value = self._canon(attr, groups["value"])
            land = w.land_of(attr, value)
            return Task("reverse", land, f"reverse:{attr}:{land}", attr, land, value)
        if proto.kind in ("count", "list"):
            value = self._canon(attr, groups["value"])
            lands = tuple(w.lands_with(attr, value))
            return Task(proto.kind, len(lands) if proto.kind == "count" else lands, f"{proto.kind}:{attr}:{value}",
                        attr, "", value)
        if proto.kind == "arith":
            a = context_number if proto.followup else int(groups["a"])
            if a is None:
                return None
            b = int(groups["b"])
            return Task("arith", OPS[proto.op][1](a, b), f"arith:{a}{proto.op}{b}", numbers=(a, b), op=proto.op,
                        followup=proto.followup)
        if proto.kind == "count_items":
            items = tuple(s.strip() for s in groups["items"].split(","))
            return Task("count_items", len(items), f"items:{','.join(items)}", items=items)
        # story: the subject is a creature, a ruler or a land
        phrase = groups["value"]
        for about in ("creature", "ruler", "land"):
            found = w.find(about, phrase)
            if found:
                land = found[0] if about == "land" else (w.land_of("ruler", found[0]) if about == "ruler" else "")
                return Task("story", found[0], f"story:{found[0]}", about, land, phrase)
        return None

    def parse_turns(self, user_texts: list[str]) -> list[Task | None]:
        """Parse each user turn of a dialog in order, carrying the land and number they refer back to."""
        tasks: list[Task | None] = []
        land, number = "", None
        for text in user_texts:
            task = self.parse(text, land, number)
            tasks.append(task)
            if task is not None and task.land:
                land = task.land
            else:
                mentioned = self.world.find("land", text)
                land = mentioned[-1] if mentioned else land
            number = task.answer if task is not None and task.kind == "arith" else None
        return tasks
