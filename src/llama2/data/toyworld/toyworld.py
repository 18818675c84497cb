"""`ToyWorld(seed)`: the one object later stages use to get data from the toy world and to judge outputs.

Every method takes its own seed (or `random.Random`) so that each dataset is reproducible on its own and
independent of the order in which others were generated; nothing touches global random state.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence

from llama2.data.formats import Message, PreferenceRecord
from llama2.data.toyworld import answers, constraints, corpus, lexicon, safety, tasks
from llama2.data.toyworld.constraints import Constraint, ConstraintSet
from llama2.data.toyworld.dialogs import Prompt, constrained_dialog, eval_prompt, sft_dialog, user_followups
from llama2.data.toyworld.judges import Judges, PromptInfo
from llama2.data.toyworld.pairs import Candidate, candidates, preference_pair
from llama2.data.toyworld.safety import SafetyRules
from llama2.data.toyworld.tasks import TaskParser
from llama2.data.toyworld.world import World

VERSION = 7  # bump when generated data changes for the same seed


def template_words() -> frozenset[str]:
    """Every lowercase word in the world's templates and word lists: the world's language, minus names."""
    words: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, str):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]+", re.sub(r"\{[a-zA-Z_]+\}", " ", value)))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)

    for module in (lexicon, tasks, answers, safety, constraints, corpus):
        for name, value in vars(module).items():
            if name.isupper():
                walk(value)
    return frozenset(words)


class ToyWorld:
    """The toy world of DESIGN §5: facts, datasets, and the oracle judges, all from one seed."""

    def __init__(self, seed: int = 0, n_lands: int = 60):
        self.seed = seed
        self.vocabulary = template_words()
        self.world = World(seed, n_lands, reserved=self.vocabulary)
        self.parser = TaskParser(self.world)
        self.rules = SafetyRules(self.world)
        names = {w.lower() for w in self.world.find_names()}
        self.constraints = ConstraintSet(self.world, self.vocabulary | names | {str(i) for i in range(10)})
        self.judges = Judges(self.world, self.parser, self.rules, self.constraints)

    def _rng(self, purpose: str, seed: int | None) -> random.Random:
        return random.Random(f"toyworld-{self.seed}-{purpose}-{seed if seed is not None else 0}")

    # ------------------------------------------------------------------------------------------ datasets

    def pretraining_corpus(self, n_chars: int, seed: int | None = None) -> Iterator[str]:
        """Documents (articles, stories, dialogues, arithmetic) adding up to about `n_chars` characters."""
        return corpus.documents(self, self._rng("corpus", seed), n_chars)

    def sft_dialogs(self, n: int, seed: int | None = None, **rates: float) -> list[list[Message]]:
        """`n` demonstration dialogs (1–6 turns, ending with the assistant). `rates`: see `sft_dialog`."""
        rng = self._rng("sft", seed)
        return [sft_dialog(self, rng, **rates) for _ in range(n)]

    def eval_prompts(self, kind: str, n: int, seed: int | None = None) -> list[Prompt]:
        """Held-out prompts: kind "helpful", "adversarial" or "borderline"; `meta` says what is asked."""
        rng = self._rng(f"eval-{kind}", seed)
        return [eval_prompt(self, rng, kind) for _ in range(n)]

    def preference_pairs(self, kind: str, n: int, split: str = "train", seed: int | None = None
                         ) -> list[PreferenceRecord]:
        """`n` labelled pairs; kind "helpfulness" or "safety", split "train" or "test" (held-out prompts)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = self._rng(f"pairs-{kind}-{split}", seed)
        return [preference_pair(self, kind, rng, split) for _ in range(n)]

    def candidates(self, dialog: Sequence[Message], seed: int | None = None) -> list[Candidate]:
        """Responses of varied, known quality to the dialog's last user turn."""
        return candidates(self, list(dialog), self._rng("candidates", seed))

    def gatt_constraints(self, held_out: bool = False) -> list[Constraint]:
        """Every constraint of the training pool, or of the held-out pool."""
        return self.constraints.pool(held_out)

    def sample_constraints(self, rng: random.Random, held_out: bool = False,
                           pick: Callable[[list[Constraint]], Constraint] | None = None) -> list[Constraint]:
        """1–3 constraints of different kinds combined at random (with at least one held-out if asked); `pick`
        chooses among a kind's seen constraints (default: at random)."""
        return self.constraints.sample(rng, held_out, pick=pick)

    def constrained_dialogs(self, n: int, seed: int | None = None, transformed_hobby_rate: float = 0.0
                            ) -> list[list[Message]]:
        """One-turn dialogs with a constraint system message and a reply that obeys it; at
        `transformed_hobby_rate` the constraints pair a hobby with Backspeak or uppercase."""
        rng = self._rng("constrained", seed)
        return [constrained_dialog(self, rng, transformed_hobby_rate=transformed_hobby_rate) for _ in range(n)]

    def user_followups(self, n: int, seed: int | None = None) -> list[str]:
        """`n` self-contained user messages, to continue a conversation for many turns (GAtt evaluation)."""
        return user_followups(self, self._rng("followups", seed), n)

    def fact_table(self) -> list[dict[str, str]]:
        return self.world.fact_table()

    # ------------------------------------------------------------------------------------------- judges

    def analyze(self, dialog: Sequence[Message]) -> PromptInfo:
        return self.judges.analyze(dialog)

    def helpfulness(self, dialog: Sequence[Message], response: str) -> float:
        return self.judges.helpfulness(dialog, response)

    def safety(self, dialog: Sequence[Message], response: str) -> float:
        return self.judges.safety(dialog, response)

    def is_adversarial(self, prompt: str | Sequence[Message]) -> bool:
        return self.judges.is_adversarial(prompt)

    def check_constraint(self, constraints: Sequence[Constraint] | str, response: str) -> bool:
        return self.judges.check_constraint(constraints, response)
