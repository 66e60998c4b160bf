"""A run configuration as TOML: read (a file plus `--set section.key=value` overrides) and written back.

Unknown sections or keys and values of the wrong type are errors that name the key and suggest
the closest valid one, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packtune.errors import ConfigError

if TYPE_CHECKING:
    from packtune.config import Config

RENAMED_KEYS = {"data.skip_bad_rows": "data.skip_bad_records"}
"""Old key -> its new name. The old name still works and warns once per process."""
_warned_renames: set[str] = set()


def _renamed(section: str, key: str, source: str) -> str:
    """`key`, or its new name (with a FutureWarning the first time) when it was renamed."""
    new = RENAMED_KEYS.get(f"{section}.{key}")
    if new is None:
        return key
    if f"{section}.{key}" not in _warned_renames:
        _warned_renames.add(f"{section}.{key}")
        warnings.warn(f"{source}: {section}.{key} is now called {new}; the old name will stop working "
                      "in a later release", FutureWarning, stacklevel=4)
    return new.partition(".")[2]


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(choices))}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation in (str, bool) and type(value) is annotation:
        return value
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        if dataclasses.is_dataclass(item):
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item, where) for v in value]
    elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return _build(annotation, value, where)
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """A dataclass from a TOML table, each key checked like a section's keys."""
    keys = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, list(keys))}")
        values[key] = _coerce(value, keys[key], f"{where}.{key}")
    return cls(**values)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    from packtune.config import Config

    sections = typing.get_type_hints(Config)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}]{suggest(section, list(sections))}")
    obj = getattr(cfg, section)
    keys = typing.get_type_hints(type(obj))
    key = _renamed(section, key, source)
    if key not in keys:
        raise ConfigError(f"{source}: unknown key {section}.{key}{suggest(key, list(keys))}")
    setattr(obj, key, _coerce(value, keys[key], f"{source}: {section}.{key}"))


def _parse_override_value(text: str) -> Any:
    """`--set` values are TOML literals (1e-5, true, "x", [1, 2]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (defaults when `path` is None), then apply `section.key=value` overrides."""
    from packtune.config import Config

    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(cfg, section, key, _parse_override_value(text.strip()), "--set")
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML, saved beside a run so it can be repeated exactly."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        lines += [f"{k} = {_toml_literal(v)}" for k, v in table.items() if v is not None and k not in tables]
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {_toml_literal(v)}" for k, v in item.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
