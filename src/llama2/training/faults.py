"""Fault injection for the resume tests: `LLAMA2_FAULT=POINT:STEP` SIGKILLs this process at that point.

A SIGKILL cannot be caught or cleaned up after, so it is the honest stand-in for a crash, a preempted node or
an out-of-memory kill. Points: `after_step` (update STEP is done, logged and, if due, checkpointed) and
`mid_checkpoint` (the checkpoint's files are written but not yet renamed into place). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "LLAMA2_FAULT"


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get(ENV_VAR) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
