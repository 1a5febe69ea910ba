"""Typed, frozen run configurations whose fields are the original scripts' flags.

A configuration is a frozen dataclass; each field is a flag of the same name (``--batch_size`` is
``batch_size``), declared with :func:`flag`, which carries the flag's one-line help and how argparse
reads it. A command's configuration inherits from a few group classes (data, model, masking,
objective, optimisation, run); each group is one section of ``--help``.

Defaults: a field's default is the original script's. Where the embedded demonstration (no
``--data_path``) needs another value, the class lists it in ``EMBEDDED``; :func:`resolve` applies it
to the flags the user did not give, before anything is built, and ``--help`` prints both values.

This module imports neither torch nor the rest of the package: ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

from mcbeit.errors import ConfigError

C = TypeVar("C")

#: the order of the ``--help`` sections (others follow in the order their classes declare them)
SECTIONS = ("data", "tokenizer", "model", "masking", "objective", "augmentation", "fine-tuning source", "evaluation",
            "linear probing", "optimisation", "DeepSpeed", "run")


def flag(default: Any, help: str, *, choices: Sequence[Any] | None = None, nargs: str | int | None = None,  # noqa: A002
         aliases: Sequence[str] = (), negation: str | None = None, negation_help: str | None = None,
         type: Callable[[str], Any] | None = None, show_default: str | None = None,  # noqa: A002
         metavar: str | None = None, experiment: bool = True) -> Any:
    """A configuration field read from ``--<name>``.

    ``negation``: a second flag that sets a boolean False (``--disable_rel_pos_bias``); ``aliases``:
    other spellings (``--local-rank``); ``show_default``: what ``--help`` prints instead of the value
    (e.g. "cuda when present"). Booleans are ``store_true`` flags. ``experiment=False`` marks a flag
    that says how a run goes, not what it trains (workers, logging, output, devices, launchers,
    policies): a resumed checkpoint's value of it may differ (:func:`experiment_flags`).
    """
    meta = {"help": help, "choices": choices, "nargs": nargs, "aliases": tuple(aliases), "negation": negation,
            "negation_help": negation_help, "type": type, "show_default": show_default, "metavar": metavar,
            "experiment": experiment}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (configurations are frozen)")
    return dataclasses.field(default=default, metadata=meta)


class Group:
    """Base of the configuration groups: ``TITLE`` is the group's ``--help`` section."""

    TITLE: ClassVar[str] = ""
    #: values of the embedded demonstration (no --data_path) where they differ from the field's default
    EMBEDDED: ClassVar[Mapping[str, Any]] = {}


def _owner_titles(cls: type) -> dict[str, str]:
    """field name -> the ``TITLE`` of the class (in the MRO) that declares it."""
    titles: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            if dataclasses.is_dataclass(klass) and name in {f.name for f in dataclasses.fields(klass)}:
                titles.setdefault(name, getattr(klass, "TITLE", "") or "other")  # the class that declares it first
    return titles


def embedded_values(cls: type) -> dict[str, Any]:
    """Every ``EMBEDDED`` entry along the MRO (a subclass wins)."""
    values: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        values.update(vars(klass).get("EMBEDDED", {}))
    return values


def _fmt(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return "''" if value == "" else str(value)


def _default_text(cls: type, field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta.get("show_default"):
        return meta["show_default"]
    text = _fmt(field.default)
    embedded = embedded_values(cls)
    if field.name in embedded and embedded[field.name] != field.default:
        text += f"; {_fmt(embedded[field.name])} without --data_path (the embedded data)"
    return text


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One argparse flag per field of ``cls``, grouped by the class that declares it; every help line
    ends with the real default (both presets' where they differ). Flags not given are absent from
    the parsed namespace (``argparse.SUPPRESS``), so :func:`resolve` knows what the user chose."""
    titles = _owner_titles(cls)
    present = set(titles.values())
    groups = {title: parser.add_argument_group(title) for title in SECTIONS if title in present}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            continue  # a value the run derives, not a flag
        title = titles.get(field.name, "other")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        names = [f"--{field.name}", *meta["aliases"]]
        help_text = f"{meta['help']} (default: {_default_text(cls, field)})".replace("%", "%%")
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text)
        if isinstance(field.default, bool) and meta["type"] is not None:  # unilm's bool_flag: --flag True/False
            group.add_argument(*names, nargs="?", const=True, type=meta["type"], metavar="{True,False}", **common)
            continue
        if isinstance(field.default, bool):
            group.add_argument(*names, action="store_true", **common)
            if meta["negation"]:
                group.add_argument(meta["negation"], action="store_false", dest=field.name, default=argparse.SUPPRESS,
                                   help=meta["negation_help"] or f"the opposite of --{field.name}")
            continue
        kind = meta["type"] or _scalar_type(cls, field)
        extra = {k: meta[k] for k in ("choices", "nargs", "metavar") if meta[k] is not None}
        group.add_argument(*names, type=kind, **common, **extra)
    return parser


def _scalar_type(cls: type, field: dataclasses.Field) -> Callable[[str], Any]:
    """The type argparse converts a value with, from the default (or the annotation when it is None)."""
    value = field.default
    if isinstance(value, tuple) and value:
        value = value[0]
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return type(value)
    annotation = str(field.type)
    for name, kind in (("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def resolve(cls: type[C], given: Mapping[str, Any], *, embedded: bool | None = None) -> C:
    """The configuration of the flags in ``given`` (a parsed namespace's dict: only flags the user
    passed), the ``EMBEDDED`` values for the others when the run is on the embedded data (no
    ``data_path``), the field defaults for the rest; then the class's ``derive`` fills derived values
    and ``check`` validates (both optional classmethods / methods)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown settings {unknown} for {cls.__name__}")
    if embedded is None:
        embedded = given.get("data_path") is None
    values = {k: v for k, v in embedded_values(cls).items() if k in names} if embedded else {}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    config = cls(**values)
    derive = getattr(config, "derive", None)
    if derive is not None:
        config = derive(set(given))
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def experiment_flags(cls: type) -> tuple[str, ...]:
    """The flags of ``cls`` that define the experiment (model, data, method, objective, batch, schedules):
    every flag not declared with ``experiment=False`` (by ``cls`` or a base it re-declares the flag of: a
    command's own ``--output_dir`` default stays a run flag). Auto-resume compares them with the checkpoint's."""
    run_flags = {name for klass in cls.__mro__ for name, f in vars(klass).get("__dataclass_fields__", {}).items()
                 if not f.metadata.get("experiment", True)}
    return tuple(f.name for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in run_flags)


def as_flags(config: Any) -> dict[str, Any]:
    """Flag values as checkpoints store them (``args``): plain values only (None, bool, int, float, str
    and lists of them; anything else as its ``str``), so ``torch.load(weights_only=True)`` reads them.
    ``config``: a configuration, an ``argparse.Namespace`` or a mapping."""
    if dataclasses.is_dataclass(config):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        items = dict(vars(config) if isinstance(config, argparse.Namespace) else config)
    plain = (bool, int, float, str)
    out: dict[str, Any] = {}
    for key, value in items.items():
        if value is None or isinstance(value, plain):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


def from_flags(cls: type[C], args: Mapping[str, Any]) -> C:
    """The configuration a checkpoint's ``args`` (:func:`as_flags`) describe, for rebuilding its model: the flags
    ``cls`` has (lists back to tuples), its defaults for the ones an older checkpoint lacks; other keys ignored.
    Not derived nor checked again: the values are the run's, already resolved."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in names})


def bool_flag(text: str) -> bool:
    """unilm's ``utils.bool_flag``: ``--flag True`` / ``--flag False`` (also on/off, 1/0, yes/no); give it as a
    boolean field's ``type`` and a bare ``--flag`` still means True."""
    value = str(text).strip().lower()
    if value in ("true", "1", "on", "yes", "t", "y"):
        return True
    if value in ("false", "0", "off", "no", "f", "n"):
        return False
    raise ValueError(f"{text!r} is not a boolean: use True or False")


bool_flag.__name__ = "boolean"  # argparse's "invalid boolean value: 'x'"
