"""The seeds' config files as presets, and their KEY=VALUE overrides: one reading for `mcbeit-seg` (mmseg configs,
``--options``) and `mcbeit-det` (detectron2 LazyConfigs, trailing ``KEY=VALUE``).

A seed's config is a preset: a name in the command's ``PRESETS`` (the values the config file sets) and a file of
that name shipped under the command's ``configs/`` folder (``preset = 'NAME'`` plus a dict of KEY=VALUE overrides in
the seed's syntax). Keys are the seed tool's config keys, mapped to the command's flags by its ``OPTION_KEYS``.
"""
from __future__ import annotations

import runpy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mcbeit.errors import ConfigError, InputError

__all__ = ["option_value", "parse_key_values", "read_preset_file"]


def option_value(text: str) -> Any:
    """A value as mmcv's ``DictAction`` (and detectron2's override parser, for these types) reads it: int, then
    float, then true / false, then a list or tuple (``a,b``, ``[a,b]``, ``(a,b)``), else the string (``None`` stays
    the string 'None', as there; quotes around it are dropped)."""
    text = text.strip().strip("'\"")
    if not text:
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text[:1] in "[(" and text[-1:] in "])":
        values = [option_value(v) for v in _split_top(text[1:-1])]
        return tuple(values) if text[0] == "(" else values
    if "," in text:
        return [option_value(v) for v in _split_top(text)]
    return text


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[(" and 1 or 0
        depth -= ch in "])" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def parse_key_values(items: Iterable[str], keys: Mapping[str, str], *, prefix: str = "", unknown: str,
                     example: str) -> dict[str, Any]:
    """``KEY=VALUE`` items -> {flag: value} through ``keys`` (config key -> flag); lists become tuples. An item
    without ``=`` or with a key not in ``keys`` is a ``ConfigError`` (``prefix`` + the key + ``unknown`` + the
    known keys; ``example`` shows the form)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{prefix}{item}: expected KEY=VALUE (e.g. {example})")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise ConfigError(f"{prefix}{key}: {unknown}; known keys: {', '.join(keys)}")
        value = option_value(value)
        out[keys[key]] = tuple(value) if isinstance(value, list) else value
    return out


def read_preset_file(spec: str, presets: Mapping[str, Mapping[str, Any]], overrides_name: str,
                     parse: Callable[[tuple[str, ...]], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A config argument -> (preset name, the values it sets).

    ``spec`` is a preset name, or a path to one of the shipped seed configs (``.py`` may be left out, as the seeds'
    READMEs write it) holding ``preset = 'NAME'`` and optionally a dict ``<overrides_name>`` of config keys to values,
    read by ``parse`` on top of the preset's values."""
    path = Path(spec)
    candidates = [path, path.with_name(path.name + ".py")] if path.suffix != ".py" else [path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        name = path.stem if path.suffix == ".py" else path.name
        if name in presets:
            return name, dict(presets[name])
        raise InputError(f"config {spec}: neither a file nor one of the presets: {', '.join(presets)}")
    values = runpy.run_path(str(found))
    name = values.get("preset", found.stem)
    if name not in presets:
        raise InputError(f"config {found}: preset {name!r} is not one of {', '.join(presets)}")
    overrides = values.get(overrides_name, {})
    if not isinstance(overrides, dict):
        raise InputError(f"config {found}: {overrides_name} must be a dict of config keys to values")
    items = tuple(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    return name, {**presets[name], **parse(items)}
