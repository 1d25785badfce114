"""Typed dataclass settings from YAML and dotted overrides: the engine under :mod:`xray_match.config`
(the training schema) and :mod:`xray_match.serve.config` (the index and service settings).

It knows no schema. :func:`F` declares a field with its range; :func:`build` turns a nested dict
into the dataclass, checking every key and coercing every value to the field's type;
:func:`check_ranges` checks the ranges; :func:`read_yaml` and :func:`merge` lay a YAML file over a
dict of defaults, and :func:`apply_overrides` applies ``key.sub=value`` items. Every failure is a
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range (the message names the key)."""


def F(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, help: str = "", **kw):
    """A dataclass field with range metadata checked by :func:`check_ranges`."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, help=help).items() if v is not None}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# ----------------------------------------------------------------------------- YAML and dotted overrides


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty one)."""
    with open(path) as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any] | list[str]) -> None:
    """Set ``{"optim.lr": 3e-4}`` or ``["optim.lr=3e-4"]`` in the nested dict ``d`` (keys must exist)."""
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    for key, value in items:
        set_dotted(d, key, value)


def split_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``: the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])!r} (in override {key!r})")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown key {key!r}")
    node[parts[-1]] = value


def merge(base: dict[str, Any], new: dict[str, Any], source: str, prefix: str = "") -> None:
    """Lay ``new`` (read from ``source``) over ``base`` in place; a key ``base`` lacks is an error."""
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"unknown key {key!r} in {source}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            merge(base[k], v, source, f"{key}.")
        else:
            base[k] = v


# ----------------------------------------------------------------------------- typed dataclasses


def build(cls: type, d: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` from the nested dict ``d``: an unknown key is refused, each value is
    coerced to its field's type (``prefix``: where ``d`` sits, for the messages)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown key {prefix + k!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(hints[f.name], d[f.name], prefix + f.name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _coerce(args[0], value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got bool {value!r}")
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got str {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """The ranges :func:`F` declared, of every field of the dataclass ``cfg`` and its sections."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            check_ranges(v, key + ".")
            continue
        if isinstance(v, list):  # a list of sections, e.g. data.sources
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{key}[{i}].")
            continue
        m = f.metadata
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "ge" in m and not v >= m["ge"]:
                raise ConfigError(f"{key}: {v} is out of range (must be >= {m['ge']})")
            if "gt" in m and not v > m["gt"]:
                raise ConfigError(f"{key}: {v} is out of range (must be > {m['gt']})")
            if "le" in m and not v <= m["le"]:
                raise ConfigError(f"{key}: {v} is out of range (must be <= {m['le']})")
            if "lt" in m and not v < m["lt"]:
                raise ConfigError(f"{key}: {v} is out of range (must be < {m['lt']})")
