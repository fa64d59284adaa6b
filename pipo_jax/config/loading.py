"""Loading configs: YAML files plus ``key=value`` overrides, strict coercion to the schema's
types, JSON round trips of saved configs (``config.json`` beside every checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipo_jax.config.bounds import FieldError
from pipo_jax.config.schema import Config
from pipo_jax.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; lists become tuples, ints floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads exponent floats without a dot, like 1e-3, as strings.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; valid keys here: "
            f"{', '.join(prefix + n for n in sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:  # the section class's own name → the key's full path
        raise ConfigError(e.message(prefix)) from None
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def from_dict(raw: dict[str, Any]) -> Config:
    """Builds a validated ``Config`` from nested plain data (YAML / JSON)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    return _build(Config, raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: (to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
                     else plain(getattr(cfg, f.name)))
            for f in dataclasses.fields(cfg)}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b=value`` overrides (values parsed as YAML) to nested plain data.

    Each key must exist in the ``Config`` schema; setting the same key twice is an error.
    """
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. sft.steps=100)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"config key {key} is overridden twice")
        seen.add(key)
        parts = key.split(".")
        cls: Any = Config
        node = raw
        for i, part in enumerate(parts):
            names = ({f.name: f for f in dataclasses.fields(cls)}
                     if dataclasses.is_dataclass(cls) else {})
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"unknown config key {key}: {part!r} is not a field of {where}; valid: "
                    f"{', '.join(sorted(names)) or '(none: it is a value)'}")
            cls = typing.get_type_hints(cls)[part]
            if i < len(parts) - 1:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {'.'.join(parts[:i + 1])} is not a section")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {e}") from e
        node[parts[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so ``steps: 3`` then ``steps: 30`` would train for 30 steps unannounced)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": keys it brings in
                continue  # may be overridden by the mapping's own, as YAML intends
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML (or JSON) config file and applies ``key=value`` overrides; a file that is not
    UTF-8 text, not valid YAML or sets a key twice is a ``ConfigError``."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); give a YAML "
                              "file") from e
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from e
    return from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


# Fields whose default changed meaning when they were added: a config saved before (every saved
# config lists every field, so a missing one predates it) gets the value it ran with.
# (``split``: the reference augmentation, then with a fixed count of splits per row.)
_FILLED_IN_SAVED = {("data", "task"): "addition", ("sft", "pad_augment"): "split"}
# Keys that configs saved before each stage had its own config class carry in sections that
# never read them (every stage shared one class): dropped on load, since they did nothing.
_UNUSED_IN_SAVED = {
    "teacher": ("w_mtp", "w_conf", "pad_augment", "pad_ratio_max", "pad_dense_frac",
                "detach_confidence_inputs"),
    "ar": ("w_mtp", "w_conf", "pad_augment", "pad_ratio_max", "pad_dense_frac",
           "detach_confidence_inputs"),
    "opd": ("pad_augment", "pad_ratio_max", "pad_dense_frac"),
}


def saved_from_dict(raw: dict[str, Any]) -> Config:
    """``from_dict`` for a config saved with a run (``save_config``, checkpoints), also by an
    earlier version: a run saved before ``data.task`` existed trained on ``addition``, not on
    today's default; keys a stage never read (before per-stage config classes) are dropped."""
    if not isinstance(raw, dict):
        return from_dict(raw)  # its error
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for (section, key), value in _FILLED_IN_SAVED.items():
        if isinstance(raw.get(section), dict):
            raw[section].setdefault(key, value)
    for section, keys in _UNUSED_IN_SAVED.items():
        if isinstance(raw.get(section), dict):
            for key in keys:
                raw[section].pop(key, None)
    return from_dict(raw)


def config_from_json(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p} is missing: not a pipo-jax run directory?") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is corrupt (invalid JSON: {e})") from e
    return saved_from_dict(raw)
