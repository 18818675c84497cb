"""GAtt constraints (SPEC §9): hobby, language, public figure and answer format, with rule checkers.

Every constraint is checkable on free text by a simple rule, and each has a verbose and a terse wording
("Always act as Queen Mira and sign every answer with your name." / "Figure: Queen Mira"); both parse back.
The languages are deterministic transforms of English words, so a reply "in Backspeak" can be decoded and
then checked for the hobby or the figure like any other reply. Names (lands, cities, rivers, rulers) keep
their spelling in every language, as names do when people translate: "Always act as Queen Mira" in
Backspeak is signed "dengiS, Queen Mira". Spelling an invented name backwards letter by letter is a skill of
its own that a tiny model does not learn, and with it the language constraint tested spelling, not whether
the instruction was kept (toy world version 5). Some hobbies, emojis, figures, the
Zedspeak language and the one-sentence format are held out of training to test zero-shot generalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llama2.data.toyworld import lexicon
from llama2.data.toyworld.world import World, held_out

KINDS = ("hobby", "language", "figure", "format")
LANGUAGES = ("Backspeak", "Zedspeak")  # every word reversed / every word ends in "zo"
HELD_OUT_LANGUAGES = ("Zedspeak",)
HELD_OUT_FORMATS = ("one_sentence",)
WORD_LIMITS = (12, 16, 20)
HOBBY_LINE, SIGNATURE = "I enjoy {value}.", "Signed, {value}."  # how `apply` obeys a hobby and a figure
_WORD = re.compile(r"[A-Za-z]+")
_EMOJI = "".join(lexicon.EMOJIS)


@dataclass(frozen=True)
class Constraint:
    """One instruction. `value`: the hobby, language, figure, or format ("uppercase", "emoji:🌟", "max_words:12")."""

    kind: str
    value: str
    held_out: bool = False

    @property
    def category(self) -> str:
        """"hobby", "language", "figure", or the format's name ("uppercase", "emoji", "max_words", ...)."""
        return self.kind if self.kind != "format" else self.value.split(":")[0]

    def verbose(self) -> str:
        fmt, _, arg = self.value.partition(":")
        return {
            "hobby": f"You enjoy {self.value}. Always mention {self.value} in your answers.",
            "language": f"Always speak in {self.value}.",
            "figure": f"Always act as {self.value} and sign every answer with your name.",
            "format": {"uppercase": "Always answer in capital letters.",
                       "emoji": f"Always end your answers with the emoji {arg}.",
                       "max_words": f"Always answer in at most {arg} words.",
                       "one_sentence": "Always answer in one sentence only."}.get(fmt, ""),
        }[self.kind]

    def terse(self) -> str:
        fmt, _, arg = self.value.partition(":")
        if self.kind == "format":
            return {"uppercase": "Format: uppercase", "emoji": f"Format: end with {arg}",
                    "max_words": f"Format: at most {arg} words", "one_sentence": "Format: one sentence"}[fmt]
        return f"{self.kind.capitalize()}: {self.value}"


def wording(constraints: Sequence[Constraint], terse: bool) -> str:
    return " ".join(c.terse() if terse else c.verbose() for c in constraints)


# --------------------------------------------------------------------------------------------- languages


def _encode_word(language: str, word: str) -> str:
    if language == "Backspeak":
        return word[::-1]
    return word + ("ZO" if word.isupper() and len(word) > 1 else "zo")


def _decode_word(language: str, word: str) -> str:
    if language == "Backspeak":
        return word[::-1]
    return word[:-2] if word.lower().endswith("zo") else word


def encode_language(language: str, text: str, names: frozenset[str] = frozenset()) -> str:
    """`text` in `language`; words whose lowercase form is in `names` are kept as they are."""
    return _WORD.sub(lambda m: m.group(0) if m.group(0).lower() in names else _encode_word(language, m.group(0)),
                     text)


def decode_language(language: str, text: str, names: frozenset[str] = frozenset()) -> str:
    """`text` in `language` back to English; words whose lowercase form is in `names` were never encoded."""
    return _WORD.sub(lambda m: m.group(0) if m.group(0).lower() in names else _decode_word(language, m.group(0)),
                     text)


def _strip_emoji(text: str) -> str:
    return text.rstrip().rstrip(_EMOJI).rstrip()


# ----------------------------------------------------------------------------------------------- the set


class ConstraintSet:
    """All constraints of a world, their sampling, their wordings' parser and their checkers."""

    def __init__(self, world: World, vocabulary: frozenset[str]):
        self.world = world
        self.vocabulary = vocabulary  # lowercase words of the world's language: decides "is this Backspeak"
        self.names = frozenset(n.lower() for n in world.find_names())  # kept as they are in every language
        self.all: list[Constraint] = []
        for hobby in lexicon.HOBBIES:
            self.all.append(Constraint("hobby", hobby, hobby in lexicon.HELD_OUT_HOBBIES))
        for language in LANGUAGES:
            self.all.append(Constraint("language", language, language in HELD_OUT_LANGUAGES))
        for figure in world.figures:
            self.all.append(Constraint("figure", figure, held_out(f"figure:{figure}", 20)))
        self.all.append(Constraint("format", "uppercase"))
        for emoji in lexicon.EMOJIS:
            self.all.append(Constraint("format", f"emoji:{emoji}", emoji in lexicon.HELD_OUT_EMOJIS))
        for n in WORD_LIMITS:
            self.all.append(Constraint("format", f"max_words:{n}"))
        self.all.append(Constraint("format", "one_sentence", "one_sentence" in HELD_OUT_FORMATS))
        patterns = []
        for c in self.all:
            for text in (c.verbose(), c.terse()):
                patterns.append((text, c))
        patterns.sort(key=lambda p: -len(p[0]))  # longest first: "Format: at most 12 words" before shorter ones
        self._wording_re = re.compile("|".join(re.escape(t) for t, _ in patterns))
        self._by_text = dict(patterns)

    def pool(self, held_out: bool) -> list[Constraint]:
        return [c for c in self.all if c.held_out == held_out]

    def sample(self, rng: random.Random, held_out: bool = False, k: int | None = None,
               pick: Callable[[list[Constraint]], Constraint] | None = None) -> list[Constraint]:
        """1–3 constraints of different kinds, combined at random; at most one format.

        With `held_out=True` at least one constraint comes from the held-out pool, the rest may be seen ones.
        `pick` chooses a seen constraint among a kind's options (default: `rng.choice`).
        """
        pick = pick or rng.choice
        k = k or rng.choice((1, 1, 2, 2, 3))
        seen, unseen = self.pool(False), self.pool(True)
        chosen: list[Constraint] = []
        if held_out:
            chosen.append(rng.choice(unseen))
        kinds = [kind for kind in KINDS if kind not in {c.kind for c in chosen}]
        rng.shuffle(kinds)
        for kind in kinds[: k - len(chosen)]:
            chosen.append(pick([c for c in seen if c.kind == kind]))
        return sorted(chosen, key=lambda c: KINDS.index(c.kind))

    def sample_transformed_hobby(self, rng: random.Random) -> list[Constraint]:
        """A seen hobby with Backspeak or the uppercase format (and a third constraint half the time): a reply
        must copy the hobby from the instruction and transform it, which the demo model got wrong most."""
        seen = self.pool(False)
        hobby = rng.choice([c for c in seen if c.kind == "hobby"])
        transform = rng.choice([c for c in seen if c.value in ("Backspeak", "uppercase")])
        return self.third_half_the_time(rng, [hobby, transform])

    def third_half_the_time(self, rng: random.Random, chosen: list[Constraint]) -> list[Constraint]:
        """`chosen` and, half the time, a seen constraint of another kind, in the order of `KINDS`."""
        if rng.random() < 0.5:
            kinds = {c.kind for c in chosen}
            chosen = [*chosen, rng.choice([c for c in self.pool(False) if c.kind not in kinds])]
        return sorted(chosen, key=lambda c: KINDS.index(c.kind))

    def parse(self, text: str) -> tuple[list[Constraint], str]:
        """Constraints worded anywhere in `text` (system message, or appended to a user turn), and the rest."""
        found = [self._by_text[m.group(0)] for m in self._wording_re.finditer(text)]
        rest = self._wording_re.sub("", text).strip()
        return sorted(set(found), key=lambda c: (KINDS.index(c.kind), c.value)), re.sub(r"\s{2,}", " ", rest)

    # -------------------------------------------------------------------------------------------- apply

    def apply(self, constraints: Sequence[Constraint], reply: str) -> str:
        """Rewrite a plain reply so that it obeys the constraints (used to write GAtt-style demonstrations)."""
        by_kind = {c.kind: c for c in constraints}
        text = reply
        if "hobby" in by_kind:
            text += " " + HOBBY_LINE.format(value=by_kind["hobby"].value)
        if "figure" in by_kind:
            text += " " + SIGNATURE.format(value=by_kind["figure"].value)
        if "language" in by_kind:
            text = encode_language(by_kind["language"].value, text, self.names)
        fmt = by_kind["format"].value if "format" in by_kind else ""
        if fmt == "uppercase":
            text = text.upper()
        elif fmt.startswith("emoji:"):
            text += " " + fmt.split(":", 1)[1]
        return text

    # -------------------------------------------------------------------------------------------- check

    def check(self, constraints: Sequence[Constraint] | str, reply: str) -> dict[Constraint, bool]:
        """Each constraint -> obeyed? A string is parsed for constraint wordings first."""
        if isinstance(constraints, str):
            constraints = self.parse(constraints)[0]
        language = next((c.value for c in constraints if c.kind == "language"), "")
        plain = self.decode(language, _strip_emoji(reply))
        return {c: self._check_one(c, reply, plain) for c in constraints}

    def decode(self, language: str, text: str) -> str:
        """A reply in `language` ("" for English) as English."""
        return decode_language(language, text, self.names) if language else text

    def _check_one(self, c: Constraint, reply: str, plain: str) -> bool:
        low = plain.lower()
        if c.kind == "hobby":
            return re.search(rf"\b{re.escape(c.value)}\b", low) is not None
        if c.kind == "figure":
            bare = c.value.split(" ", 1)[1].lower()
            return re.search(rf"\b{re.escape(bare)}\b", low) is not None
        if c.kind == "language":
            return self._is_language(c.value, _strip_emoji(reply))
        fmt, _, arg = c.value.partition(":")
        if fmt == "uppercase":
            letters = [ch for ch in reply if ch.isalpha()]
            return bool(letters) and all(ch.isupper() for ch in letters)
        if fmt == "emoji":
            return reply.rstrip().endswith(arg)
        if fmt == "max_words":
            return 0 < len(_strip_emoji(reply).split()) <= int(arg)
        # one_sentence: exactly one sentence end, at the end
        body = _strip_emoji(reply)
        return bool(body) and len(re.findall(r"[.!?]+", body)) == 1 and body[-1] in ".!?"

    def _is_language(self, language: str, text: str) -> bool:
        words = [w.lower() for w in _WORD.findall(text) if w.lower() not in self.names]
        if not words:
            return False
        if language == "Zedspeak":
            return sum(w.endswith("zo") for w in words) >= 0.8 * len(words)
        decoded = sum(w[::-1] in self.vocabulary for w in words)
        plain = sum(w in self.vocabulary for w in words)
        return decoded >= 0.6 * len(words) and decoded > plain
