"""Run configs from YAML presets and `key.path=value` overrides, and the resume policy.

`load_config(path, overrides)` starts from the dataclass defaults (the tiny CPU run), merges the
sparse YAML preset, then the overrides; every key is checked against the schema, and the
dataclasses check every value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing

import yaml

from jmoe.train.config import Config

# Keys that may differ between a run and its resumption: they change how long it runs or how it
# reports, not what it computes. train.steps moves the end of the run; the learning-rate schedule
# keeps the length the run directory started with (jmoe.train.trainer.learning_rate_schedule).
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_to_keep",
    "train.max_bad_steps",
    "train.progress",
    "train.plot",
    "train.wandb_project",
)


def load_config(
    path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """The defaults, then the YAML file at `path` (sparse nested overrides), then `overrides`.

    Args:
      path: a YAML file such as `configs/small.yaml`, or None for the defaults (tiny CPU run).
      overrides: `"key.path=value"` strings; values are parsed as YAML (`true`, `1e-3`, `null`).

    Returns:
      The validated `Config`. An unknown key raises a ValueError naming the key, the allowed keys
      at that level and the closest one; a bad value raises the dataclass's ValueError prefixed
      with the full key path.

    Example:
      >>> cfg = load_config("configs/tiny.yaml", ["model.moe.router=top_p", "train.steps=50"])
    """
    tree = config_to_dict(Config())
    if path is not None:
        loaded = _read_yaml(path)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config sections, got {loaded!r}")
        _merge(tree, loaded, Config, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        try:
            nested: typing.Any = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            nested = text  # not YAML (e.g. a glob like *.txt): the raw text

        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(tree, nested, Config, prefix="")
    return config_from_dict(tree)


def _read_yaml(path: str | os.PathLike):
    """The YAML document at `path` ({} when empty); a syntax error names the file, line and
    column."""
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            what = ": ".join(part for part in (e.context, e.problem) if part)
            raise ValueError(f"{os.fspath(path)}{where}: YAML syntax error: {what}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{os.fspath(path)}: YAML syntax error: {e}") from None


def config_to_dict(config) -> dict:
    """The config as nested plain dicts (YAML / JSON safe)."""
    return dataclasses.asdict(config)


def config_from_dict(tree: dict, cls: type = Config, prefix: str = ""):
    """Builds `cls` from a complete nested dict, prefixing validation errors with the key path."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        value = tree[field.name]
        if dataclasses.is_dataclass(hints[field.name]):
            value = config_from_dict(value, hints[field.name], f"{prefix}{field.name}.")
        kwargs[field.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        if prefix and not str(e).startswith(prefix):
            raise ValueError(f"{prefix.rstrip('.')}: {e}") from None
        raise


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (`load_config(path)` reads it back)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)  # readers never see a half-written file


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(a) | set(b))
    diff = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diff.append(f"{prefix}{key}")
    return diff


def _merge(tree: dict, update: dict, cls: type, prefix: str) -> None:
    """Merges `update` into `tree` (the dict of dataclass `cls`), checking keys and value types."""
    if not isinstance(update, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {update!r}")
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in hints:
            allowed = sorted(hints)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {path!r}: allowed keys are {allowed}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            _merge(tree[key], value if value is not None else {}, kind, f"{path}.")
        else:
            tree[key] = _coerce(path, value, kind)


def _coerce(path: str, value, kind):
    """`value` as the annotated type `kind`. YAML reads `1e-3` as text (floats are parsed) and
    `null` as None (a text-only field such as `router` takes it as the text "null")."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    if value is None and str in allowed:
        return "null"
    if float in allowed and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = any(isinstance(value, t) for t in allowed if t is not type(None))
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"config key {path!r}={value!r} is invalid: must be {names}")
    return value
