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


def overlay(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`params` with dotted-key `overrides` set; a key params.yaml lacks is a ConfigError naming the key meant."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        node, parts = out, key.split(".")
        for i, part in enumerate(parts):
            parent = ".".join(parts[:i])
            if not isinstance(node, dict):
                raise ConfigError(f"params: `{parent}` is a value, not a section, in override `{key}`")
            if part not in node:
                known = [str(k) for k in node]
                close = difflib.get_close_matches(part, known, n=1)
                where = f"`{parent}`" if i else "params.yaml"
                hint = (f" (did you mean `{parent + '.' if i else ''}{close[0]}`?)" if close
                        else f"; {where} has: {', '.join(known)}")
                raise ConfigError(f"params: unknown key `{'.'.join(parts[:i + 1])}`{hint} (override `{key}={value}`)")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def stage_classes(workspace: Path) -> dict[str, type]:
    """section -> params dataclass for each project stage dvc.yaml runs (`python -m stages.<x>`)."""
    out = {}
    for spec in dvc_stages(workspace).values():
        m = STAGE_MODULE.search(str((spec or {}).get("cmd", "")))
        if not m:
            continue  # not one of ours (a toy stage, a shell step): its params are checked when it runs
        module = importlib.import_module(m.group(1))
        section, cls = getattr(module, "SECTION", None), getattr(module, "PARAMS_CLASS", None)
        if section and cls:
            out[section] = cls
    return out


def check(workspace: str | Path, overrides: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The workspace's params (or `params`) with `overrides` applied and checked; a ConfigError, nothing written."""
    ws = Path(workspace)
    try:
        merged = overlay(read_yaml(ws / "params.yaml") if params is None else params, overrides)
        classes = {"base": Base, **stage_classes(ws)}
        for section in sorted({key.split(".")[0] for key in overrides} & set(classes)):
            build(classes[section], merged.get(section) or {}, section)
    except (FileNotFoundError, ValueError) as e:
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
