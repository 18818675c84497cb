"""Write the toy world's datasets as files (`llama2 data toyworld`), plus a manifest with their counts.

The files depend only on (seed, size, VERSION): the same arguments give byte-identical files. Timings are
printed, never written, for that reason.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2.data.formats import dumps
from llama2.data.toyworld.dialogs import EVAL_KINDS
from llama2.data.toyworld.pairs import PAIR_KINDS
from llama2.data.toyworld.toyworld import VERSION, ToyWorld


@dataclass(frozen=True)
class Size:
    corpus_chars: int
    valid_chars: int
    sft_train: int
    sft_valid: int
    eval_prompts: int
    pairs_train: int
    pairs_test: int


SIZES = {
    # tests and smoke runs: about a second
    "small": Size(400_000, 20_000, 400, 50, 60, 400, 100),
    # the demo: >= 10M tokens of a 2,048-piece tokenizer in ~48 MB of text
    "default": Size(48_000_000, 480_000, 20_000, 1_000, 500, 10_000, 1_000),
}


def _write_lines(path: Path, lines: Iterable[str]) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def _write_corpus(path: Path, docs: Iterable[str]) -> tuple[int, int]:
    n = chars = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(doc + "\n\n")  # a blank line ends a document (formats.iter_text)
            n += 1
            chars += len(doc)
    return n, chars


def write_toyworld(out: str | Path, seed: int = 0, size: str = "default",
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write every dataset under `out`; returns the manifest (also written as `manifest.json`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (expected one of {', '.join(SIZES)})")
    sz, out = SIZES[size], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tw = ToyWorld(seed)
    files: dict[str, dict[str, Any]] = {}

    def step(name: str, start: float, **info: Any) -> None:
        files[name] = info
        log(f"  {name:32s} {json.dumps(info, ensure_ascii=False)[:90]}  ({time.perf_counter() - start:.1f}s)")

    t = time.perf_counter()
    docs, chars = _write_corpus(out / "pretrain.txt", tw.pretraining_corpus(sz.corpus_chars, seed=0))
    step("pretrain.txt", t, kind="text", documents=docs, chars=chars)
    t = time.perf_counter()
    docs, chars = _write_corpus(out / "pretrain_valid.txt", tw.pretraining_corpus(sz.valid_chars, seed=1))
    step("pretrain_valid.txt", t, kind="text", documents=docs, chars=chars)

    for name, n, s in (("sft_train.jsonl", sz.sft_train, 0), ("sft_valid.jsonl", sz.sft_valid, 1)):
        t = time.perf_counter()
        dialogs = tw.sft_dialogs(n, seed=s)
        turns = Counter(sum(m["role"] == "user" for m in d) for d in dialogs)
        _write_lines(out / name, (dumps({"messages": d}) for d in dialogs))
        step(name, t, kind="chat", records=n, turns=dict(sorted(turns.items())),
             with_system=sum(d[0]["role"] == "system" for d in dialogs))

    for kind in EVAL_KINDS:
        t = time.perf_counter()
        n = sz.eval_prompts if kind != "borderline" else sz.eval_prompts // 2
        prompts = tw.eval_prompts(kind, n)
        _write_lines(out / f"eval_{kind}.jsonl", (dumps(p.to_dict()) for p in prompts))
        step(f"eval_{kind}.jsonl", t, kind="chat", records=n)

    for kind in PAIR_KINDS:
        for split, n in (("train", sz.pairs_train), ("test", sz.pairs_test)):
            t = time.perf_counter()
            pairs = tw.preference_pairs(kind, n, split)
            _write_lines(out / f"pref_{kind}_{split}.jsonl", (dumps(p.to_dict()) for p in pairs))
            info: dict[str, Any] = {"kind": "preference", "records": n,
                                    "ratings": dict(sorted(Counter(p.rating for p in pairs).items()))}
            if kind == "safety":
                info["safety_bins"] = dict(sorted(Counter(
                    f"chosen_{'safe' if p.safety['chosen_safe'] else 'unsafe'}_"
                    f"rejected_{'safe' if p.safety['rejected_safe'] else 'unsafe'}" for p in pairs).items()))
            step(f"pref_{kind}_{split}.jsonl", t, **info)

    t = time.perf_counter()
    constraints = tw.gatt_constraints(False) + tw.gatt_constraints(True)
    _write_lines(out / "gatt_constraints.jsonl", (dumps({"kind": c.kind, "value": c.value, "held_out": c.held_out,
                                                          "verbose": c.verbose(), "terse": c.terse()})
                                                   for c in constraints))
    step("gatt_constraints.jsonl", t, kind="constraints", records=len(constraints),
         held_out=sum(c.held_out for c in constraints))
    t = time.perf_counter()
    facts = tw.fact_table()
    _write_lines(out / "facts.jsonl", (dumps(f) for f in facts))
    step("facts.jsonl", t, kind="facts", records=len(facts))

    manifest = {"name": "toyworld", "version": VERSION, "seed": seed, "size": size, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
