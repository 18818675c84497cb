"""Readers for the benchmark files under shared/data, returning items already in lm-eval's prompt form.

Each reader applies the matching lm-eval 0.4.13 task's `doc_to_text` and `doc_to_choice`
(tasks/piqa/piqa.yaml, tasks/openbookqa/openbookqa.yaml), so the scoring code never sees a raw record and the
templates live in one place.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llama2.data.formats import FormatError


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: `context` is the prompt, `choices` the answers without their leading space."""

    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str
    """GSM8K's worked solution, ending with `#### <number>`."""


def piqa_context(goal: str) -> str:
    """piqa.yaml's `doc_to_text: "Question: {{goal}}\\nAnswer:"`."""
    return f"Question: {goal}\nAnswer:"


def read_piqa(folder: Path) -> list[ChoiceItem]:
    """PIQA's validation split: `valid.jsonl` (goal, sol1, sol2) with `valid-labels.lst` (0 or 1 a line)."""
    records = [json.loads(line) for line in (folder / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = (folder / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(records) != len(labels):
        raise ValueError(f"{folder}: {len(records)} PIQA records but {len(labels)} labels")
    return [ChoiceItem(piqa_context(r["goal"]), [r["sol1"], r["sol2"]], int(label))
            for r, label in zip(records, labels, strict=True)]


_OBQA_MARKER = re.compile(r" ?\(([A-D])\) ")
"""`(A) ` … `(D) ` with the one space that separates a choice from the next marker."""


def split_obqa_choices(text: str) -> list[str]:
    """`"(A) a marsh (B) a tundra (C) the plains (D) a desert"` -> the four choice texts, in A-D order."""
    parts = _OBQA_MARKER.split(text)  # ['', 'A', 'a marsh', 'B', 'a tundra', ...]
    labels, choices = parts[1::2], parts[2::2]
    if parts[0] or labels != ["A", "B", "C", "D"]:
        raise ValueError(f"expected choices marked (A) to (D), got {text!r}")
    return choices


def read_openbookqa(path: Path) -> list[ChoiceItem]:
    """OpenBookQA's test TSV; openbookqa.yaml uses `question_stem` as the prompt and the choice texts as is."""
    file = path / "test.tsv" if path.is_dir() else path
    with file.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    items = []
    for n, row in enumerate(rows, start=2):
        try:
            choices = split_obqa_choices(row["Choices"])
        except ValueError as exc:
            raise FormatError(file, n, "Choices", str(exc)) from None
        items.append(ChoiceItem(row["Question Stem"], choices, "ABCD".index(row["Answer Key"].strip())))
    return items


def read_gsm8k(path: Path) -> list[MathProblem]:
    """GSM8K jsonl (`question`, `answer`); a folder means its `test.jsonl`."""
    file = path / "test.jsonl" if path.is_dir() else path
    lines = file.read_text(encoding="utf-8").splitlines()
    return [MathProblem(r["question"], r["answer"]) for r in map(json.loads, filter(str.strip, lines))]
