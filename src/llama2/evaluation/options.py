"""Typed reads of `--option key=value` settings, so a malformed value fails with the option's name."""

from __future__ import annotations

from llama2.evaluation.registry import EvalContext


def int_option(ctx: EvalContext, key: str, default: int) -> int:
    value = ctx.options.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--option {key}= expects an integer, got {value!r}") from None


def float_option(ctx: EvalContext, key: str, default: float) -> float:
    value = ctx.options.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--option {key}= expects a number, got {value!r}") from None


def required_option(ctx: EvalContext, key: str, what: str) -> str:
    value = ctx.options.get(key)
    if not value:
        raise ValueError(f"this task needs --option {key}=... ({what})")
    return value
