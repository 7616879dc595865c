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

from jmoe.moe.routers import ROUTERS, Router, router_from_dict, router_to_dict
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

    Examples:
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
    """The config as nested plain dicts (YAML / JSON safe); a router as `{kind: ..., ...}`."""
    tree = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Router):
            value = router_to_dict(value)
        elif dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        tree[field.name] = value
    return tree


def config_from_dict(tree: dict, cls: type = Config, prefix: str = ""):
    """Builds `cls` from a complete nested dict, prefixing validation errors with the key path."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        value, kind = tree[field.name], hints[field.name]
        if kind is Router:
            value = _with_prefix(f"{prefix}{field.name}.", router_from_dict, value)
        elif dataclasses.is_dataclass(kind):
            value = config_from_dict(value, kind, f"{prefix}{field.name}.")
        kwargs[field.name] = value
    return _with_prefix(prefix, cls, **kwargs)


def _with_prefix(prefix: str, build, *args, **kwargs):
    """`build(*args, **kwargs)`, with the key path `prefix` in front of a ValueError."""
    try:
        return build(*args, **kwargs)
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
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(_unknown_key(cls, str(key), path, prefix, fields))
        kind = hints[key]
        if kind is Router:
            _merge_router(tree, key, value, path)
        elif dataclasses.is_dataclass(kind):
            _merge(tree[key], value if value is not None else {}, kind, f"{path}.")
        else:
            tree[key] = _coerce(path, value, kind)


def _unknown_key(cls: type, key: str, path: str, prefix: str, allowed: list[str]) -> str:
    moved = getattr(cls, "MOVED_FIELDS", {}).get(key)
    if moved is not None:
        return f"config key {path!r} has moved: use {prefix}{moved}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return f"unknown config key {path!r}: allowed keys are {sorted(allowed)}{hint}"


def _merge_router(tree: dict, key: str, value, path: str) -> None:
    """A router is `{kind: name, field: value, ...}` or a bare kind name (its defaults). A new
    kind starts from that router's defaults; the same kind updates the given fields."""
    if value is None:  # YAML reads `router=null` as None
        raise ValueError(
            f"config key {path!r} is None: the null-expert router is kind 'null_experts', e.g. "
            f"{path}=null_experts {path}.num_null=8 {path}.k=4"
        )
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueError(
            f"config key {path!r}={value!r} is invalid: must be a router kind, one of "
            f"{sorted(ROUTERS)}, or a mapping such as {{kind: top_p, p: 0.4}}"
        )
    current = tree[key]
    kind = value.get("kind", current["kind"])
    if kind not in ROUTERS:
        raise ValueError(
            f"config key {path}.kind={kind!r} is invalid: must be one of {sorted(ROUTERS)}"
        )
    if kind != current["kind"]:
        current = tree[key] = {"kind": kind}
    cls = ROUTERS[kind]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for name, field_value in value.items():
        if name == "kind":
            continue
        if name not in fields:
            raise ValueError(
                f"{_unknown_key(cls, str(name), f'{path}.{name}', f'{path}.', fields)} "
                f"(of router kind {kind!r})"
            )
        current[name] = _coerce(f"{path}.{name}", field_value, hints[name])


def _coerce(path: str, value, kind):
    """`value` as the annotated type `kind`. YAML reads `1e-3` as text (floats are parsed)."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
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
