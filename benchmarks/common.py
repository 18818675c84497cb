"""Helpers shared by the benchmarks: timing, machine description, Markdown tables."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from llama2.machine import describe_machine, machine_line


def machine() -> str:
    return machine_line(describe_machine())


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls after `warmup` calls (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Wall times (seconds) of each function over `repeats` rounds, one call of each per round in turn, after
    `warmup` calls of each. A shared VM's speed drifts by a fifth or more over minutes; it slows the calls of one
    round alike, so ratios taken round by round (`median_ratio`) compare the functions more fairly than times
    taken one function after the other."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(slower: list[float], faster: list[float]) -> float:
    """The median over rounds of one function's time over another's (see `alternating_times`)."""
    return statistics.median(a / b for a, b in zip(slower, faster, strict=True))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def model_benchmark_main(run: Callable[[str, str, str], list[dict]], description: str) -> None:
    """`--device`, `--preset` and `--dtype` for a benchmark of a random-weight model, then its table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="stories15M")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    print(f"machine: {machine()}\n")
    print(markdown_table(run(a.device, a.preset, a.dtype)))
