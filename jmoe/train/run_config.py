"""Run configs from YAML presets and `key.path=value` overrides, and the resume policy.

`load_config(path, overrides)` starts from the dataclass defaults (the tiny CPU run), merges the
sparse YAML preset, then the overrides; every key is checked against the schema, and the
dataclasses check every value. With `model.init_from=DIR` (a Hugging Face checkpoint) the model
section is the checkpoint's config plus the run's own training-side model keys
(`jmoe.train.init_from`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing

import yaml

from jmoe.lm.config import ModelConfig
from jmoe.moe.routers import ROUTERS, Router, router_from_dict, router_to_dict
from jmoe.train import init_from
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
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    resolve_init_from: bool = True,
) -> Config:
    """The defaults, then the YAML file at `path` (sparse nested overrides), then `overrides`.

    Args:
      path: a YAML file such as `configs/small.yaml`, or None for the defaults (tiny CPU run).
      overrides: `"key.path=value"` strings; values are parsed as YAML (`true`, `1e-3`, `null`).
        An optional section (a `X | None` dataclass field such as `model.mla`) stays None until
        one of its keys is set, then starts from its fields' defaults; `section=null` turns it
        off again.
      resolve_init_from: with `model.init_from`, build the model section from the checkpoint's
        config.json; False reads a resolved config as it is (a run directory's config.yaml,
        which needs no checkpoint).

    Returns:
      The validated `Config`. An unknown key raises a ValueError naming the key, the allowed keys
      at that level and the closest one; a bad value raises the dataclass's ValueError prefixed
      with the full key path.

    Example:
      >>> cfg = load_config("configs/tiny.yaml", ["model.moe.router=top_p", "train.steps=50"])
    """
    tree = config_to_dict(Config())
    updates = []  # what the file and the overrides set, in order
    if path is not None:
        loaded = _read_yaml(path)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config sections, got {loaded!r}")
        _merge(tree, loaded, Config, prefix="")
        updates.append(loaded)
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
        updates.append(nested)
    if resolve_init_from and tree["model"]["init_from"] is not None:
        tree["model"] = _imported_model(tree["model"]["init_from"], updates)
    return config_from_dict(tree)


def _imported_model(source: str, updates: list[dict]) -> dict:
    """The model tree of `model.init_from=source`: the checkpoint's config with the run's own
    model keys applied, those that change the checkpoint's math refused (`jmoe.train.init_from`).
    """
    imported = config_to_dict(init_from.checkpoint_model_config(source))
    model, given = copy.deepcopy(imported), {}
    for update in updates:
        if "tokenizer" in (update.get("data") or {}):
            raise ValueError(
                f"data.tokenizer is the checkpoint's with model.init_from={source!r}: drop "
                "the data.tokenizer setting"
            )
        part = update.get("model")
        if part is not None:
            _merge(model, part, ModelConfig, prefix="model.")
            _merge_plain(given, part)
    init_from.check_model_overrides(imported, given, model, source)
    model["init_from"] = imported["init_from"]  # absolute: a resumed run may start elsewhere
    return model


def _merge_plain(tree: dict, update: dict) -> None:
    """Deep-merges nested dict `update` into `tree` (later values win)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_plain(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


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
        elif isinstance(value, tuple):  # e.g. model.layer_types; YAML has lists only
            value = list(value)
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
        elif (inner := _optional_dataclass(kind)) is not None and value is not None:
            path = f"{prefix}{field.name}"
            missing = [f"{path}.{f.name}" for f in dataclasses.fields(inner) if f.name not in value]
            if missing:
                raise ValueError(
                    f"config key {path!r} is incomplete: set {', '.join(missing)} "
                    f"(or {path}=null to leave it out)"
                )
            value = config_from_dict(value, inner, f"{path}.")
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
        elif (inner := _optional_dataclass(kind)) is not None and value is not None:
            if tree[key] is None:  # switched on: start from the fields' defaults
                tree[key] = {
                    f.name: f.default
                    for f in dataclasses.fields(inner)
                    if f.default is not dataclasses.MISSING
                }
            _merge(tree[key], value, inner, f"{path}.")
        else:
            tree[key] = _coerce(path, value, kind)


def _optional_dataclass(kind) -> type | None:
    """The dataclass `X` of an `X | None` annotation (an optional config section), else None."""
    args = typing.get_args(kind)
    inner = [t for t in args if t is not type(None)]
    if len(args) == 2 and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return inner[0]
    return None


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
    """`value` as the annotated type `kind`. YAML reads `1e-3` as text (floats are parsed) and
    has lists only (a list becomes a tuple where one is expected)."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    allowed = tuple(
        typing.get_origin(t) or t for t in (typing.get_args(kind) if union else (kind,))
    )
    if tuple in allowed and isinstance(value, list):
        value = tuple(value)
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
