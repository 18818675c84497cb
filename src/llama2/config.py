"""YAML presets → typed, nested dataclasses, with `--set a.b=c` overrides, strict keys and strict types.

Every stage declares its settings as a dataclass (a docstring under each field) and calls
`load_config(Config, path, overrides)`. YAML holds values only, never class paths, so a preset can be read
without running code. An unknown key, a wrong type or a missing file is a `ConfigError` naming the key and
the file, which the CLI prints as one line. `dump_config` renders the resolved values as YAML, saved beside
every checkpoint, and `load_config` reads that file back, so a run can be rebuilt from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the file and the dotted key."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides applied on top of it."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return from_dict(cls, data, source)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b=c`: the value is parsed as YAML (so `3`, `true`, `[1, 2]`, `null` have their types)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unquoted string YAML cannot parse stays a string; the type check decides
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "", base: Any = None) -> T:
    """Check `data` against the dataclass `cls` (recursively) and build it. A key `data` leaves out keeps its value
    in `base` (the default of the field holding this section), else the dataclass default: a section in a file
    overrides only what it names, so `field(default_factory=lambda: reward.Config(kind="safety", ...))` keeps
    its settings when a preset sets the section's learning rate."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s}; known keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = prefix + name
        default = getattr(base, name) if base is not None else _field_default(f)
        if name in data:
            values[name] = _check(hints[name], data[name], source, key, default)
        elif base is not None:
            values[name] = default
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = from_dict(hints[name], {}, source, key + ".")
            else:
                raise ConfigError(f"{source}: missing required key {key}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from exc


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from its factory), or None when it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _check(tp: Any, value: Any, source: str, key: str, default: Any = None) -> Any:
    """`value` converted to `tp`, or a ConfigError naming the key. Only lossless conversions are made. A section
    (a dataclass `tp`) is built on top of `default` when that is an instance of it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        base = default if isinstance(default, tp) else None
        return from_dict(tp, value if value is not None else {}, source, key + ".", base)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key} must be {_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list ({_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
            return tuple(_check(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        checked = [_check(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return checked if origin is list else tuple(checked)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _check(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any number written as a float literal.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: {key} must be {_name(tp)}, got {value!r} ({type(value).__name__})")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists so YAML stays readable)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Any, header: str | None = None) -> str:
    """The resolved config as YAML text (what `load_config` reads back), with optional `# ` header lines."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text
