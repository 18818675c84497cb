"""ToxiGen's prompt files (microsoft/TOXIGEN `prompts/<label>_<group>_1k.txt`): read, render, and label.

Each line lists 4–6 statements about one target group, written as "- statement" items joined by a literal
backslash-n and ending in a dangling "-", so that a language model adds one more statement of the same kind
(hateful in `hate_*` files, benign in `neutral_*` files). The ToxiGen authors sent that raw line to GPT-3 and
stopped at the next (literal) "\\n"; we render the list with real newlines, the form a document would have,
and keep the continuation up to its first newline: in both cases the model writes exactly one list item.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PAPER_GROUPS = (
    "asian", "black", "chinese", "jewish", "latino", "lgbtq", "mental_disability", "mexican", "middle_east",
    "muslim", "native_american", "physical_disability", "women",
)
"""The 13 target groups of the Llama 2 paper's ToxiGen table (Table 45); the files add bisexual, immigrant, trans."""

LABELS = ("hate", "neutral")
_FILE = re.compile(r"^(hate|neutral)_(.+)_1k\.txt$")


@dataclass(frozen=True)
class ToxiGenPrompt:
    """One prompt line: its file's label and target group, and its statements without the "- " bullets."""

    label: str
    group: str
    statements: tuple[str, ...]

    @property
    def text(self) -> str:
        """The bulleted list with real newlines and a final "-" for the model to continue."""
        return "".join(f"- {s}\n" for s in self.statements) + "-"


def parse_statements(line: str) -> tuple[str, ...]:
    """The statements of one raw line; also handles the dangling "-" glued to the last statement in a few files."""
    line = line.strip()
    line = line.removesuffix("\\n-") if line.endswith("\\n-") else line.removesuffix("-")
    statements = (part.strip().removeprefix("-").strip() for part in line.split("\\n"))
    return tuple(s for s in statements if s)


def read_toxigen(folder: Path) -> list[ToxiGenPrompt]:
    """Every prompt of every `<label>_<group>_1k.txt` file in `folder`, files in name order, lines in file order."""
    files = sorted(p for p in folder.iterdir() if _FILE.match(p.name))
    if not files:
        raise FileNotFoundError(f"no ToxiGen prompt files (<hate|neutral>_<group>_1k.txt) in {folder}")
    prompts = []
    for path in files:
        label, group = _FILE.match(path.name).groups()
        for line in path.read_text(encoding="utf-8").splitlines():
            if statements := parse_statements(line):
                prompts.append(ToxiGenPrompt(label, group, statements))
    return prompts


def labelled_statements(prompts: list[ToxiGenPrompt]) -> list[tuple[str, int]]:
    """Unique statements with 1 (from a hate file) or 0 (neutral), sorted; any statement under both is dropped.

    The 31,000 prompts are resamplings of a few hundred human-written demonstrations, so deduplicating is what
    makes a held-out split honest: otherwise the same sentence sits on both sides.
    """
    labels: dict[str, set[int]] = {}
    for p in prompts:
        for s in p.statements:
            labels.setdefault(s, set()).add(int(p.label == "hate"))
    return sorted((s, next(iter(v))) for s, v in labels.items() if len(v) == 1)


def first_statement(continuation: str) -> str:
    """The list item the model wrote: its continuation up to the first newline."""
    return continuation.split("\n", 1)[0].strip()
