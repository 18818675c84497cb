"""Where the evaluation data lives when `--data` is not given."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def shared_data(*parts: str) -> Path:
    """A path under `$LLAMA2_SHARED_DATA`, or `<repo>/../shared/data` (where the project keeps public data)."""
    root = Path(os.environ.get("LLAMA2_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root.joinpath(*parts)


def task_data(given: Path | None, *default: str) -> Path:
    """`--data` if given, else the shared-data default; a clear error names both when it is missing."""
    path = given if given is not None else shared_data(*default)
    if not path.exists():
        hint = "" if given is not None else " (pass --data or set LLAMA2_SHARED_DATA)"
        raise FileNotFoundError(f"evaluation data not found: {path}{hint}")
    return path
