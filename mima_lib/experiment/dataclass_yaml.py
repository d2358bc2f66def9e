"""Configuration as plain data: dataclasses filled from YAML, checked before anything runs.

`from_dict(Cls, data)` walks a (nested) dataclass and rejects unknown keys, wrong types and values outside
a field's declared range, naming the key and the fix. Ranges and choices live in the field metadata:

    steps: int = field(default=400, metadata={"min": 0})
    method: str = field(default="lora", metadata={"choices": ("lora", "dreambooth")})
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A parameter file or dict is malformed; the message names the key and the fix."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_value(value, tp, key: str):
    """Return value converted to tp (int -> float allowed, list -> tuple), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                          f"{[_type_name(a) for a in args]}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}; write [a, b]")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # {name: settings}
            return {k: _check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value, meta: dict, key: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if "choices" in meta and v not in meta["choices"]:
            close = difflib.get_close_matches(str(v), [str(c) for c in meta["choices"]], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {v!r} is not one of {list(meta['choices'])}{hint}")
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{key}: {v!r} is below the minimum {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{key}: {v!r} is above the maximum {meta['max']}")


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass cls from data, checking keys, types and ranges (recursively)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        moved = getattr(cls, "MOVED_KEYS", {})  # {old key: its new place}, for files written before a move
        if k in moved:
            raise ConfigError(f"'{prefix}{k}' has moved to '{moved[k]}'; write it there")
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
        raise ConfigError(f"unknown key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        value = _check_value(data[name], hints[name], key)
        _check_range(value, dict(f.metadata), key)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; malformed files fail with the file name and the parser's line."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"parameter file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"parameter file {path} must be a mapping of key: value, got {type(data).__name__}")
    return data
