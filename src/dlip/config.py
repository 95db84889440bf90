"""The typed-config engine every config of dlip uses: frozen dataclasses, strict keys, a
small yaml diff and dotted `key=value` overrides.

    config = load(PretrainConfig, "configs/pretrain/tiny_synth.yaml", ["optim.lr=1e-4"])
    save_resolved(config, run_dir)  # run_dir/config.yaml, loads back to `config`

Resolution order: the dataclass's defaults <- the yaml (only what differs) <- `key=value`
overrides, in command-line order. A value is parsed as YAML, so `optim.lr=1e-4` is a float,
`teacher.checkpoint=null` is None and `data.manifests=[a.jsonl,b.jsonl]` is a list. Sections
(nested dataclasses) and mapping fields merge key by key, so `loss.kd.weights.kd_itc=1` sets one
weight; every other value is replaced whole. Unknown keys at any depth and wrongly typed values
are `ConfigError`s naming the dotted key; a config class's `validate()` (run by `load`) checks
what spans fields. The model's JSON configs (dlip.models.config) use `type_ok` and `check_keys`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from dlip.fileio import atomic_write_text

RESOLVED_NAME = "config.yaml"


class ConfigError(ValueError):
    """A config file or dict is malformed: unknown key, wrong type or inconsistent values."""


# ------------------------------------------------------------------------------ load and save
def load(
    cls: type,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    aliases: Mapping[str, str] | None = None,
) -> Any:
    """`cls`'s defaults <- yaml at `path` (if any) <- `key=value` overrides, then its
    `validate()` when asked. `aliases`: command-line shortcuts -> full dotted keys."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    merged = _merge(cls, plain(dataclasses.asdict(cls())), data, "", source)
    for item in overrides:
        key, value = parse_override(item, aliases)
        merged = _merge(cls, merged, _nest(key, value), "", f"override {item!r}")
    config = _build(cls, merged, "")
    return config.validate() if validate else config


def parse_override(item: str, aliases: Mapping[str, str] | None = None) -> tuple[str, Any]:
    """`"optim.lr=1e-4"` -> ("optim.lr", 1e-4); the value is parsed as YAML, aliases expanded."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return (aliases or {}).get(key, key), value


def save_resolved(config: Any, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml`: every field, so `load` of it gives back an equal config."""
    text = yaml.safe_dump(to_plain(config), sort_keys=False)
    return atomic_write_text(Path(run_dir) / RESOLVED_NAME, text)


def to_plain(config: Any) -> dict[str, Any]:
    """A config dataclass as YAML-safe data (tuples become lists); `build` turns it back."""
    return plain(dataclasses.asdict(config))


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1, hence PyYAML, needs a dot: 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# ------------------------------------------------------------------------------------ helpers
def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(cls: type, base: dict, update: Any, prefix: str, source: str) -> dict[str, Any]:
    """`base` (a full plain dict of `cls`) updated by the diff `update`, keys checked."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(update, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {update!r}")
    hints = _fields(cls)
    out = dict(base)
    for key, value in update.items():
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{did_you_mean(cls, prefix, key)}; "
                f"valid keys at {where}: {sorted(hints)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            out[key] = _merge(tp, base[key], value, f"{prefix}{key}.", source)
        elif _is_mapping(tp) and isinstance(value, Mapping) and isinstance(base[key], Mapping):
            out[key] = deep_merge(base[key], value)
        else:
            out[key] = value
    return out


def did_you_mean(cls: type, prefix: str, key: str) -> str:
    """` (did you mean optim.lr?)`: a close key of the same section, else a key anywhere below
    `cls` whose last part is `key` or close to it (`lr` -> optim.lr); "" when nothing is."""
    import difflib

    close = difflib.get_close_matches(key, list(_fields(cls)), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    paths = key_paths(cls, prefix)
    same = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    tails = {p.rsplit(".", 1)[-1]: p for p in paths}
    near = same or [tails[t] for t in difflib.get_close_matches(key, list(tails), n=1, cutoff=0.8)]
    return f" (did you mean {near[0]}?)" if near else ""


def key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of `cls`'s tree (leaves only)."""
    out = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out += key_paths(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            out.append(f"{prefix}{name}")
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Construct `cls` from a full plain dict: sections recursively, YAML lists as tuples."""
    kwargs = {}
    for name, tp in _fields(cls).items():
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value)
    # Nested sections' field types are checked here too, so a section that does not check its
    # own (a dataclass from another module, such as the KD config) gets errors naming the key.
    section = prefix.rstrip(".") or "config"
    for name, tp in _fields(cls).items():
        if prefix and not type_ok(tp, kwargs[name]):
            raise ConfigError(f"{section}.{name}={kwargs[name]!r} is not {describe(tp)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{section}: {err}") from None


def build(cls: type, data: Mapping[str, Any], source: str = "config") -> Any:
    """`cls`'s defaults <- `data` (a nested diff), keys and types checked (no validate())."""
    return _build(cls, _merge(cls, plain(dataclasses.asdict(cls())), data, "", source), "")


def _coerce(tp: Any, value: Any) -> Any:
    """YAML -> field type where lossless: a list for a tuple field, an int for a float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and value is not None:
                coerced = _coerce(arg, value)
                if type_ok(arg, coerced):
                    return coerced
        return value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(items, value, strict=True))
        return tuple(value)
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        return {k: _coerce(typing.get_args(tp)[1], v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_mapping(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping)


def describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (dict, Mapping):
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin in (list, Sequence):
        return f"a list of {describe(args[0])}"
    names = {type(None): "null", bool: "a bool", int: "an int", float: "a finite number"}
    names[str] = "a str"
    return names.get(tp, "anything" if tp is Any else getattr(tp, "__name__", str(tp)))


def check_types(obj: Any, section: str) -> None:
    for name, tp in _fields(type(obj)).items():
        value = getattr(obj, name)
        if not type_ok(tp, value):
            raise ConfigError(f"{section}.{name}={value!r} is not {describe(tp)}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {rule}")


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def plain(value: Any) -> Any:
    """Tuples -> lists and Mappings -> dicts, recursively (what yaml.safe_dump can write)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_keys(cls: type, data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")


def type_ok(tp: Any, value: Any) -> bool:
    """`value` is of the annotated type `tp`: exact (a bool is not an int, "768" is not an
    int), ints accepted for floats, inf and nan are not floats; unions, Literal, tuples (fixed
    or variadic), lists / Sequences, dicts / Mappings, None and Any. Shared by model and run
    configs."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(a, value) for a in args)
    if origin is Literal:
        return value in args
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and all(
            type_ok(args[0], k) and type_ok(args[1], v) for k, v in value.items()
        )
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_ok(args[0], x) for x in value)
        return len(value) == len(args) and all(
            type_ok(a, x) for a, x in zip(args, value, strict=True)
        )
    if origin in (list, Sequence):
        return isinstance(value, (list, tuple)) and all(type_ok(args[0], x) for x in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # inf / nan (yaml `.inf`, `.nan`) mean nothing as a setting here
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    return isinstance(value, tp)


def _finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)
