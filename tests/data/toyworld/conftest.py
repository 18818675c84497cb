"""One toy world for all toy-world tests: building it compiles a few hundred regexes (~0.5 s)."""

from __future__ import annotations

import pytest

from llama2.data.toyworld import ToyWorld


@pytest.fixture(scope="session")
def tw() -> ToyWorld:
    return ToyWorld(seed=0)
