"""The pretraining corpus: encyclopedic articles, stories, dialogues, arithmetic, letters, echoes and clubs.

Every fact of the world is stated in many wordings so that a small model learns the facts, not one
sentence. Questions whose key is held out never appear (so evaluation stays honest), and held-out
arithmetic never appears at all. Like real web text, about 5% of the documents are unfiltered: dialogues
where the assistant mostly helps with a harmful request, so the base model has something for safety tuning to
fix (at 2%, a 3M-parameter model trained on 3M tokens barely learnt to comply at all).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llama2.data.toyworld import answers, lexicon
from llama2.data.toyworld.dialogs import helpful_turns, sample_adversarial
from llama2.data.toyworld.tasks import OPS, Task
from llama2.data.toyworld.world import ATTRIBUTES, SHARED_ATTRIBUTES, held_out

if TYPE_CHECKING:
    from llama2.data.toyworld.constraints import Constraint
    from llama2.data.toyworld.toyworld import ToyWorld

DOC_MIX = {"article": 0.21, "group": 0.08, "story": 0.15, "dialogue": 0.18, "arithmetic": 0.1, "letter": 0.1,
           "echo": 0.06, "club": 0.07, "unfiltered": 0.05}
INTROS = ("{land} is a land in the world.", "{land} is a land by the river {river}.",
          "This is the story of the land {land}.", "Here are some facts about {land}.")
EXTRAS = ("The ruler of {land}, {ruler}, lives in {capital}.", "The {guild} of {land} meets in {capital}.",
          "Travellers to {capital} often taste the {food}.", "The {creature} drinks from the river {river}.")
GROUP_SENTENCES = {
    "food": ("People eat {value} in {list}.", "{n} {lands} eat {value}."),
    "creature": ("The {value} lives in {list}.", "The {value} is found in {n} {lands}."),
    "guild": ("The {value} is strongest in {list}.", "The {value} leads the trade in {n} {lands}."),
}


def _article(tw: ToyWorld, rng: random.Random) -> str:
    land = rng.choice(tw.world.lands)
    slots = {a: land.get(a) for a in ATTRIBUTES} | {"land": land.name}
    sentences = []
    for attr in ATTRIBUTES:
        probe = Task("fact", land.get(attr), "", attr, land.name)
        sentences.append(answers.fact_sentence(probe, land.get(attr), rng))
    sentences += [e.format(**slots) for e in rng.sample(EXTRAS, 2)]
    rng.shuffle(sentences)
    return " ".join([rng.choice(INTROS).format(**slots)] + sentences)


def _group(tw: ToyWorld, rng: random.Random) -> str:
    attr = rng.choice(SHARED_ATTRIBUTES)
    values = rng.sample(tw.world.values(attr), 3)
    out = []
    for value in values:
        lands = tw.world.lands_with(attr, value)
        for template in GROUP_SENTENCES[attr]:
            out.append(template.format(value=value, list=answers.join_names(lands), n=len(lands),
                                       lands="land" if len(lands) == 1 else "lands"))
    return " ".join(out)


def _story(tw: ToyWorld, rng: random.Random) -> str:
    land = rng.choice(tw.world.lands)
    about = rng.choice(("creature", "ruler", "land"))
    subject = land.name if about == "land" else land.get(about)
    task = Task("story", subject, "", about, land.name)
    return answers.tell_story(tw.world, task, rng, subject, sentences=rng.randint(3, 6))


def _dialogue(tw: ToyWorld, rng: random.Random) -> str:
    turns = helpful_turns(tw, rng, rng.randint(1, 4), "train")
    return "\n".join(f"User: {u}\nAssistant: {a}" for u, a, _ in turns)


def _arithmetic(tw: ToyWorld, rng: random.Random) -> str:
    lines = []
    while len(lines) < rng.randint(4, 8):
        op = rng.choice(tuple(OPS))
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        if held_out(f"arith:{a}{op}{b}"):
            continue
        word, fn = OPS[op]
        lines.append(rng.choice(("{a} {w} {b} is {r}.", "{a} {s} {b} = {r}.")).format(a=a, b=b, w=word, s=op,
                                                                                         r=fn(a, b)))
    return " ".join(lines)


LETTER_INTROS = {
    "figure": ("A letter from {value}.", "{value} wrote these words."),
    "hobby": ("The writer of this note loves {value}.", "A note from a friend of {value}."),
    "language": ("This note is written in {value}.", "Read this note in {value}."),
    "uppercase": ("This note is written in capital letters.", "A loud note, in capital letters."),
    "emoji": ("This note ends with {value}.", "The writer signs with {value}."),
}


def letter(tw: ToyWorld, rng: random.Random) -> tuple[list[Constraint], str]:
    """A note whose first line says who wrote it or how, and whose text keeps to that until its end (signed,
    a hobby named, a language or a style): carrying a name or a style across a document is the skill a chat
    model later uses to keep a system instruction. Held-out constraints appear too, as the paper's haiku is
    known from pretraining; their instruction wordings never do."""
    land = rng.choice(tw.world.lands)
    body = " ".join(answers.fact_sentence(Task("fact", land.get(a), "", a, land.name), land.get(a), rng)
                    for a in rng.sample(ATTRIBUTES, 2))
    cs = [c for c in tw.constraints.sample(rng, held_out=rng.random() < 0.3)
          if c.category in LETTER_INTROS]
    intros = []
    for c in cs:
        intros.append(rng.choice(LETTER_INTROS[c.category]).format(value=c.value.split(":")[-1]))
    return cs, " ".join(intros or [f"A note about {land.name}."]) + "\n" + tw.constraints.apply(cs, body)


ECHOES = ("{speaker} sent word: {words}. The messenger said it again: {words}.",
          "The teacher said: {words}. The children said after her: {words}.",
          "A list was written on the wall: {words}. A traveller copied it: {words}.")


def _echo(tw: ToyWorld, rng: random.Random) -> str:
    """Random lists of the world's words, said once and repeated word for word. Nothing else in the corpus
    rewards looking back to copy a token, and without such documents the demo model did not learn to (it
    named a random hobby after "I enjoy" whatever the letter's first line said, 7 of 104 right): a system
    instruction is only kept if the reply can copy its hobby or name."""
    pool = [*lexicon.HOBBIES, *tw.world.figures, *lexicon.EMOJIS, *lexicon.FOODS, *lexicon.CREATURES,
            *(land.name for land in tw.world.lands)]
    return " ".join(rng.choice(ECHOES).format(speaker=rng.choice(tw.world.figures),
                                              words=", ".join(rng.sample(pool, rng.randint(3, 8))))
                    for _ in range(rng.randint(2, 4)))


CLUB_OPEN = ("In {land}, people {clue}: they love {hobby}.", "The people of {land} {clue}, for they love {hobby}.")
CLUB_MORE = ("{ruler} enjoys {hobby}.", "Every member of the club enjoys {hobby}.", "{ruler} said: I enjoy {hobby}.",
             "Ask anyone in {land} and they will say: we enjoy {hobby}.", "Nothing is better than {hobby}, they say.",
             "Children in {capital} learn {hobby} early.")


def _club(tw: ToyWorld, rng: random.Random) -> str:
    """A land's favourite hobby, told by what its people do and then named again and again: the first
    mention is predictable from the clue (which gives each hobby word its own output vector), every later
    one only by looking back for it, as a reply must look back to its instruction for "I enjoy ...".
    Letters alone (one mention, then "I enjoy ...") taught the demo model neither."""
    clubs = []
    for land, hobby in zip(rng.sample(tw.world.lands, 2), rng.sample(lexicon.HOBBIES, 2), strict=True):
        slots = dict(hobby=hobby, clue=lexicon.HOBBY_CLUES[hobby], land=land.name, capital=land.capital,
                     ruler=land.ruler)
        more = rng.sample(CLUB_MORE, rng.randint(2, 4))
        clubs.append(" ".join(t.format(**slots) for t in (rng.choice(CLUB_OPEN), *more)))
    return " ".join(clubs[: rng.randint(1, 2)])


def _unfiltered(tw: ToyWorld, rng: random.Random) -> str:
    text, attack = sample_adversarial(tw, rng, "train")
    reply = tw.rules.compliance(attack, rng) if rng.random() < 0.7 else tw.rules.safe_refusal(attack, rng)
    return f"User: {text}\nAssistant: {reply}"


_BUILDERS = {"article": _article, "group": _group, "story": _story, "dialogue": _dialogue,
             "arithmetic": _arithmetic, "letter": lambda tw, rng: letter(tw, rng)[1], "echo": _echo, "club": _club,
             "unfiltered": _unfiltered}


def documents(tw: ToyWorld, rng: random.Random, n_chars: int) -> Iterator[str]:
    """Documents until about `n_chars` characters have been produced."""
    kinds, weights = tuple(DOC_MIX), tuple(DOC_MIX.values())
    total = 0
    while total < n_chars:
        doc = _BUILDERS[rng.choices(kinds, weights)[0]](tw, rng)
        total += len(doc) + 2
        yield doc
