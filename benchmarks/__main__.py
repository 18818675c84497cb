"""`make bench`: every benchmark module's table, with the machine it ran on.

    python -m benchmarks [NAME ...]      (default: all of BENCHMARKS)
"""

from __future__ import annotations

import importlib
import sys
import time

from benchmarks.common import machine, markdown_table

BENCHMARKS = ["foundation_cpu", "pretrain_cpu", "packed_attention_cpu", "multiturn_cpu", "serving_load", "serving_chat"]


def main(names: list[str]) -> int:
    print(f"machine: {machine()}\n")
    for name in names or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        rows = module.run()
        print(f"## {name}  (python -m benchmarks.{name}, {time.perf_counter() - start:.0f}s)\n")
        print(markdown_table(rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
