"""Typed access to `params.yaml`.

Each stage declares a frozen dataclass for its own section (nested dataclasses for sub-sections) and the
`base:` keys it uses; `load_params` builds them, rejecting unknown or misspelled keys and values of the
wrong type with a `ValueError` that names the key and the expected form (in the spirit of trl's TrlParser).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

PARAMS_FILE = "params.yaml"
KNOWN_SECTIONS = ("scrape", "index", "generate", "validate", "train", "evaluate", "model_card", "export", "serve",
                  "retrieval")


@dataclasses.dataclass(frozen=True)
class Base:
    """The shared `base:` section: what more than one stage must agree on."""

    seed: int
    model: str  # hub id or local path of the base chat model
    system_prompt: str
    hf_offline: bool  # never contact the Hugging Face hub (set for the offline profile)
    max_length: int  # tokens of one conversation: train truncates to it, every eval cross-entropy counts within it

    def check(self) -> None:
        if self.max_length < 16:
            raise ValueError("params: `base.max_length` must be an integer >= 16 (tokens of one conversation)")


def read_yaml(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stages from the repository (or workspace) root")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return data


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Any: "any value",
            _dt.date: "a date YYYY-MM-DD"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    def bad() -> ValueError:
        return ValueError(f"params: `{key}` must be {_describe(tp)}, got {value!r}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in (a for a in get_args(tp) if a is not type(None)):
            with contextlib.suppress(ValueError):
                return _coerce(value, arg, key)
        raise bad()
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        return tuple(_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, key)
    if tp in (bool, int, str):  # as written: true is no integer here, and 1 no string
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise bad()
    if tp in (float, _dt.date):
        if isinstance(value, (int, float) if tp is float else _dt.date) and not isinstance(value, bool):
            return float(value) if tp is float else value
        if not isinstance(value, str):
            raise bad()
        try:  # YAML 1.1 reads "1e-4" as a string, and a date may be quoted
            return float(value) if tp is float else _dt.date.fromisoformat(value)
        except ValueError:
            raise bad() from None
    raise TypeError(f"unsupported params type {tp!r} for `{key}`")


def build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from `data`; `prefix` is the dotted path used in error messages."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean `{prefix}.{close[0]}`?)" if close else ""
            raise ValueError(f"params: unknown key `{prefix}.{key}`{hint}; "
                             f"`{prefix}` accepts: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ValueError(f"params: missing key `{prefix}.{name}` ({_describe(hints[name])})")
        kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def load_params(section: str, cls: type[T], base_keys: typing.Iterable[str] = (),
                path: str | Path = PARAMS_FILE) -> tuple[dict[str, Any], T]:
    """Load `base:` (only `base_keys`, validated against `Base`) and the stage's own `section`.

    Raises ValueError (naming the key and the expected form) for unknown, missing or mistyped keys.
    """
    data = read_yaml(path)
    if section not in data:
        raise ValueError(f"params: missing section `{section}` in {path}")
    unknown = sorted(set(data) - {"base", *KNOWN_SECTIONS})
    if unknown:
        raise ValueError(f"params: unknown section `{unknown[0]}` in {path}; sections: base, "
                         + ", ".join(KNOWN_SECTIONS))
    full_base = build(Base, data.get("base") or {}, "base")  # validates every base key, whoever reads it
    base = {k: getattr(full_base, k) for k in base_keys}
    return base, build(cls, data[section] or {}, section)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Overlay a profile onto params; a key the base lacks is a typo, not an addition."""
    out = dict(base)
    for key, value in overlay.items():
        where = f"{prefix}{key}"
        if key not in base:
            raise ValueError(f"profile: unknown key `{where}` (not in params.yaml)")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = deep_merge(base[key], value, where + ".")
        else:
            out[key] = value
    return out


def parse_set(items: typing.Iterable[str]) -> dict[str, Any]:
    """`dvc exp run -S` semantics: `["train.lora.r=4"]` -> {"train.lora.r": 4}; values read as YAML 1.2 (so `1e-4` is a
    number, as DVC reads it)."""
    from ruamel.yaml import YAML

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"params override {item!r}: expected key=value, e.g. train.lora.r=4")
        out[key.strip()] = YAML(typ="safe").load(value) if value.strip() else ""
    return out


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.lora.r": 4} -> {"train": {"lora": {"r": 4}}}"""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
