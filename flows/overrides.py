"""Param overrides (`-S key=value`, as `dvc exp run -S`), checked before anything is written: the key exists (else
"did you mean") and the overlaid section builds through its stage's params dataclass, so a bad value fails in one
line before DVC removes any output; then params.yaml is rewritten with its comments and layout kept."""

from __future__ import annotations

import copy
import difflib
import importlib
import re
from pathlib import Path
from typing import Any

from flows.workspace import dvc_stages, edit_params
from qrb.errors import ConfigError
from qrb.params import Base, build, read_yaml

STAGE_MODULE = re.compile(r"-m\s+(stages\.\w+)")  # a dvc.yaml cmd that runs a project stage


def _unknown(key: str, known: list[str], where: str, override: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    if close:
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f" (did you mean `{parent}{close[0]}`?)"
    else:
        hint = f"; {where} has: {', '.join(known)}"
    return ConfigError(f"params: unknown key `{key}`{hint} (override `{override}`)")


def overlay(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`params` with dotted-key `overrides` set; a key params.yaml lacks is a ConfigError naming the key meant."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        node, parts = out, key.split(".")
        for i, part in enumerate(parts):
            here = ".".join(parts[:i + 1])
            if not isinstance(node, dict):
                raise ConfigError(f"params: `{'.'.join(parts[:i])}` is a value, not a section, in override `{key}`")
            if part not in node:
                where = f"`{'.'.join(parts[:i])}`" if i else "params.yaml"
                raise _unknown(here, [str(k) for k in node], where, f"{key}={value}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def stage_classes(workspace: Path) -> dict[str, tuple[type, tuple[str, ...]]]:
    """section -> (params dataclass, base keys) for each project stage dvc.yaml runs (`python -m stages.<x>`)."""
    out = {}
    for spec in dvc_stages(workspace).values():
        m = STAGE_MODULE.search(str((spec or {}).get("cmd", "")))
        if not m:
            continue  # not one of ours (a toy stage, a shell step): its params are checked when it runs
        module = importlib.import_module(m.group(1))
        section, cls = getattr(module, "SECTION", None), getattr(module, "PARAMS_CLASS", None)
        if section and cls:
            out[section] = (cls, tuple(getattr(module, "BASE_KEYS", ())))
    return out


def check(workspace: str | Path, overrides: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The workspace's params (or `params`) with `overrides` applied and checked; a ConfigError, nothing written."""
    ws = Path(workspace)
    if params is None:
        try:
            params = read_yaml(ws / "params.yaml")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    merged = overlay(params, overrides)
    sections = {key.split(".")[0] for key in overrides}
    classes = stage_classes(ws)
    try:
        if "base" in sections:
            build(Base, merged.get("base") or {}, "base")
        for section in sorted(sections & set(classes)):
            build(classes[section][0], merged.get(section) or {}, section)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return merged


def apply(params_file: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Write checked (`check`) dotted-key overrides into params.yaml; returns {key: (old, new)} of the changes."""
    changes = {}

    def set_keys(data: Any) -> None:
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            if node[leaf] != value:
                changes[key] = (node[leaf], value)
                node[leaf] = value

    text = edit_params(params_file.read_text(), set_keys)
    if changes:
        params_file.write_text(text)
    return changes
