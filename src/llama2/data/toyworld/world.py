"""Entities and the fact table: lands with a capital, a ruler, a river, a food, a creature and a guild.

Names are invented from syllables with a seeded `random.Random`, so each seed is a different world in the
same small language. Capitals, rulers and rivers are unique to one land; foods, creatures and guilds are
shared by a few lands, which gives listing and counting questions real answers.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from functools import cached_property

from llama2.data.toyworld import lexicon

ATTRIBUTES = ("capital", "ruler", "river", "food", "creature", "guild")
UNIQUE_ATTRIBUTES = ("capital", "ruler", "river")  # one land each: "Which land has the capital X?" works
SHARED_ATTRIBUTES = ("food", "creature", "guild")  # several lands each: listing and counting


@dataclass(frozen=True)
class Land:
    name: str
    capital: str
    ruler: str  # "Queen Mira": a title and a name
    pronoun: str  # the ruler's pronoun, for stories
    river: str
    food: str
    creature: str
    guild: str

    def get(self, attr: str) -> str:
        return getattr(self, attr)


def held_out(key: str, percent: int = 10) -> bool:
    """A stable ~`percent`% of task keys never appear as training questions (eval/test only).

    crc32, not `hash()`, so the split is the same in every process and on every machine.
    """
    return zlib.crc32(key.encode()) % 100 < percent


def _name(rng: random.Random, syllables: int) -> str:
    parts = []
    for i in range(syllables):
        coda = rng.choice(lexicon.CODAS) if i == syllables - 1 else ""
        parts.append(rng.choice(lexicon.ONSETS) + rng.choice(lexicon.VOWELS) + coda)
    return "".join(parts).capitalize()


class World:
    """The seeded entities and facts; every other module asks this object what is true."""

    def __init__(self, seed: int = 0, n_lands: int = 60, reserved: frozenset[str] = frozenset()):
        """`reserved`: lowercase words of the world's templates; no invented name may equal one."""
        if n_lands < len(lexicon.FOODS):
            raise ValueError(f"n_lands must be at least {len(lexicon.FOODS)} so every food has a land")
        self.seed = seed
        rng = random.Random(f"toyworld-entities-{seed}")
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < 4 * n_lands:
            name = _name(rng, rng.choice((2, 2, 3)))
            if name not in seen and len(name) >= 4 and name.lower() not in reserved:
                seen.add(name)
                names.append(name)
        lands_n, capitals, rulers, rivers = (names[i::4] for i in range(4))

        def spread(items: tuple[str, ...]) -> list[str]:
            # every item is used at least once, the rest at random: counts vary but are never zero
            out = list(items) + [rng.choice(items) for _ in range(n_lands - len(items))]
            rng.shuffle(out)
            return out

        foods, creatures, guilds = spread(lexicon.FOODS), spread(lexicon.CREATURES), spread(lexicon.GUILDS)
        self.lands: list[Land] = []
        for i in range(n_lands):
            title, pronoun = rng.choice(lexicon.TITLES)
            self.lands.append(Land(lands_n[i], capitals[i], f"{title} {rulers[i]}", pronoun, rivers[i],
                                   foods[i], creatures[i], guilds[i]))
        self.by_name = {land.name: land for land in self.lands}

    # ---------------------------------------------------------------------------------------- lookups

    def values(self, attr: str) -> list[str]:
        """Every value of one attribute, without repeats, in land order."""
        return list(dict.fromkeys(land.get(attr) for land in self.lands))

    def lands_with(self, attr: str, value: str) -> list[str]:
        return [land.name for land in self.lands if land.get(attr) == value]

    def land_of(self, attr: str, value: str) -> str:
        """The one land whose unique attribute (capital, ruler, river) is `value`."""
        (name,) = self.lands_with(attr, value)
        return name

    @cached_property
    def figures(self) -> list[str]:
        """The world's public figures (GAtt "act as"): its rulers."""
        return [land.ruler for land in self.lands]

    @cached_property
    def value_patterns(self) -> dict[str, re.Pattern[str]]:
        """One case-insensitive whole-word regex per attribute (and `land`) matching any of its values."""
        out = {}
        for attr in (*ATTRIBUTES, "land"):
            names = self._canonical[attr]
            alternation = "|".join(re.escape(v) for v in sorted(names, key=len, reverse=True))
            # rulers are matched with or without their title: "Mira" and "Queen Mira" both name her
            title = "(?:(?:King|Queen|Lord|Lady) )?" if attr == "ruler" else ""
            out[attr] = re.compile(rf"\b{title}(?:{alternation})\b", re.IGNORECASE)
        return out

    @cached_property
    def _canonical(self) -> dict[str, dict[str, str]]:
        """attr -> lowercase spelling (a ruler's bare name) -> canonical value."""
        out: dict[str, dict[str, str]] = {"land": {name.lower(): name for name in self.by_name}}
        for attr in ATTRIBUTES:
            out[attr] = {(v.split(" ", 1)[1] if attr == "ruler" else v).lower(): v for v in self.values(attr)}
        return out

    def find(self, attr: str, text: str) -> list[str]:
        """Values of `attr` mentioned in `text`, canonical spelling, in order of appearance."""
        canonical = self._canonical[attr]
        out = []
        for m in self.value_patterns[attr].finditer(text):
            word = m.group(0).lower()
            out.append(canonical[word.split(" ", 1)[1] if attr == "ruler" and " " in word else word])
        return out

    def find_names(self) -> list[str]:
        """Every single word of every invented name (lands, capitals, rulers, rivers)."""
        return [w for land in self.lands for v in (land.name, land.capital, land.ruler, land.river) for w in v.split()]

    def fact_table(self) -> list[dict[str, str]]:
        return [{"land": land.name, **{a: land.get(a) for a in ATTRIBUTES}} for land in self.lands]
