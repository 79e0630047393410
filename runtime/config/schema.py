"""The typed-section machinery: frozen dataclasses parsed strictly from plain dicts.

Every config section is a frozen dataclass deriving from `Section`. `parse_section(cls, data, where,
ctx)` turns a mapping into an instance and raises `ConfigError` naming the full key path for:

- an unknown key, with a did-you-mean drawn from the accepted names (field names and aliases);
- a value of the wrong type, naming the expected type;
- a key given twice through a field name and one of its aliases.

Field options live in dataclass metadata, built with `opt()`: `aliases` (other accepted spellings,
e.g. `stage3_prefetch_bucket_size`), `choices` (case-insensitive string choices, normalised to the
spelling listed), `check` (a callable `(value, where) -> value` for extra validation), `inert` (see
[Note: inert keys]).

[Note: inert keys] Strict means "unknown to DeepSpeed is an error", not "not implemented by dsrun is
an error". A key DeepSpeed accepts but dsrun does not act on is parsed and kept, and when its value
would change anything (not the default, not a section with `enabled: false`) one
`ConfigIgnoredKeyWarning` names its path and says why (`opt(inert="...")`). Keys DeepSpeed accepts
without reading them at all are listed in a section's `_INERT` mapping (key -> reason): accepted with
any value, warned about, and dropped. Python's warning registry shows each message once per process.

Accepted type annotations: `bool`, `int`, `float`, `str`, `dict`, `list`, `Any`, `Optional[X]`,
`Union[...]`, `Literal[...]` and nested `Section` subclasses. Numbers follow pydantic's lax mode, which
is what DeepSpeed users' configs are written against: an `int` field takes `5e8` (an integral float)
and `"3"`; a `float` field takes ints and numeric strings; `bool` is never a number and a number never
a `bool`.

[Note: leftover "auto"] `auto.py` resolves the "auto" values that have explicit rules before parsing.
An "auto" that reaches a typed field here takes `ctx.auto[<dotted path>]` or `ctx.auto[<field name>]`
when given, else the field's default (what DeepSpeed's pydantic sections do, but recorded in
`ctx.notes` instead of silently).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from dsrun.errors import ConfigError

from ..log import rank0_warns

__all__ = ["ConfigDeprecationWarning", "ConfigIgnoredKeyWarning", "warn_deprecated", "warn_adjusted", "Section", "opt", "parse_section", "ParseContext",
           "did_you_mean", "join", "unknown_key_error", "convert", "warn_ignored"]

_MISSING = dataclasses.MISSING


class ConfigDeprecationWarning(FutureWarning):
    """A deprecated DeepSpeed key was accepted and rewritten. A FutureWarning, so it is shown by default."""


class ConfigIgnoredKeyWarning(UserWarning):
    """A key DeepSpeed accepts was given a value that dsrun does not act on ([Note: inert keys])."""


_ONCE: Dict[Any, Any] = {}  # warning registry: each message once per process (reset when filters change)


def warn_ignored(path: str, reason: str) -> None:
    """One line naming the key path and why dsrun ignores it ([Note: inert keys]). Issued with an explicit
    location so that no source line of dsrun is printed under it. Rank 0 only (every rank loads the config)."""
    if not rank0_warns():
        return
    warnings.warn_explicit(f"{path}: accepted for DeepSpeed compatibility but ignored by dsrun ({reason})",
                           ConfigIgnoredKeyWarning, "dsrun config", 0, module="dsrun.runtime.config", registry=_ONCE)


def warn_deprecated(message: str) -> None:
    """One line for a deprecated key (`message` starts with its key path), in the same form as
    `warn_ignored`: an explicit location, so no source line of dsrun is printed under it. Rank 0 only."""
    if not rank0_warns():
        return
    warnings.warn_explicit(message, ConfigDeprecationWarning, "dsrun config", 0, module="dsrun.runtime.config",
                           registry=_ONCE)


def warn_adjusted(message: str) -> None:
    """One line for a setting dsrun completes or adjusts (`message` starts with its key path), in the form
    of `warn_ignored`. Rank 0 only."""
    if not rank0_warns():
        return
    warnings.warn_explicit(message, UserWarning, "dsrun config", 0, module="dsrun.runtime.config", registry=_ONCE)


def opt(default=_MISSING, *, factory=None, aliases: Tuple[str, ...] = (),
        choices: Optional[Iterable[str]] = None, check: Optional[Callable[[Any, str], Any]] = None, doc: str = "",
        inert: str = ""):
    """A dataclass field with config metadata (see the module docstring)."""
    meta = {"aliases": tuple(aliases), "choices": tuple(choices) if choices else None, "check": check, "doc": doc,
            "inert": inert}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ParseContext:
    """What parsing needs besides the data: the user's "auto" values and a log of how each was resolved."""

    auto: Mapping[str, Any] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)  # dotted path -> "value (source)"


def non_negative(value, where: str):
    """A `check` for counts and sizes: >= 0."""
    if value < 0:
        raise ConfigError(f"must be >= 0, got {value}", where=where)
    return value


class Section:
    """Mixin for config sections: dict-style read access and a canonical `to_dict()`."""

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in _field_names(type(self)) else default

    def __getitem__(self, key: str) -> Any:
        if key not in _field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in _field_names(type(self))

    def keys(self):
        return list(_field_names(type(self)))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def _before(cls, data: Dict[str, Any], where: str, ctx: ParseContext) -> Dict[str, Any]:
        """Hook: rewrite deprecated keys before field parsing. `data` is a private copy."""
        return data

    def _check(self, where: str) -> None:
        """Hook: cross-field validation after parsing."""


def _plain(value):
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # str enums
        return value.value
    return value


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def did_you_mean(word: str, options: Iterable[str]) -> Optional[str]:
    options = list(options)
    lowered = {o.lower(): o for o in options}
    if word.lower() in lowered:
        return lowered[word.lower()]
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not match:
        match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
        match = [lowered[m] for m in match]
    return match[0] if match else None


def unknown_key_error(key: str, where: str, accepted: Iterable[str], *, removed: Mapping[str, str] = None):
    path = join(where, key)
    if removed and key in removed:
        return ConfigError(f"key '{key}' was removed from DeepSpeed and is not accepted", where=path,
                           hint=removed[key])
    guess = did_you_mean(key, accepted)
    msg = f"unknown key '{key}'" + (f" (did you mean '{guess}'?)" if guess else "")
    hint = None if guess else "accepted keys here: " + ", ".join(sorted(accepted))
    return ConfigError(msg, where=path, hint=hint)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp))
                                                           else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Section):
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bad(value, tp, where: str) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ConfigError(f"expected {_type_name(tp)}, got {shown} ({type(value).__name__})", where=where)


def convert(value, tp, where: str, ctx: ParseContext):
    """Check and coerce one value against a type annotation (see the module docstring)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad(value, tp, where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where, ctx)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _bad(value, tp, where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        raise _bad(value, tp, where)
    if origin in (dict, Dict, Mapping):
        tp = dict
    if origin in (list, List):
        tp = list
    if isinstance(tp, type) and issubclass(tp, Section):
        return parse_section(tp, value, where, ctx)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(value, tp, where)
    if tp is int:
        return _to_int(value, where)
    if tp is float:
        return _to_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(value, tp, where)
    if tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _bad(value, tp, where)
    if tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise _bad(value, tp, where)
    raise AssertionError(f"unsupported annotation {tp!r} at {where}")


def _to_int(value, where: str) -> int:
    if isinstance(value, bool):
        raise _bad(value, int, where)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _bad(value, int, where) from None
        if math.isfinite(number) and number == int(number):
            return int(number)
    raise _bad(value, int, where)


def _to_float(value, where: str) -> float:
    if isinstance(value, bool):
        raise _bad(value, float, where)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _bad(value, float, where)


def _accepted_names(cls) -> Dict[str, str]:
    """Accepted spelling -> field name."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", ()):
            names[alias] = f.name
    return names


def _resolve_leftover_auto(f, where: str, ctx: ParseContext):
    for key in (where, f.name):
        if key in ctx.auto:
            ctx.notes[where] = f"{ctx.auto[key]!r} (auto[{key!r}])"
            return ctx.auto[key]
    if f.default is not _MISSING:
        default = f.default
    elif f.default_factory is not _MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        raise ConfigError("'auto' has no value here: this key has no default", where=where,
                          hint=f"give a value, or pass load_config(..., auto={{{f.name!r}: ...}})")
    ctx.notes[where] = f"{default!r} (default)"
    return default


def parse_section(cls, data, where: str, ctx: Optional[ParseContext] = None):
    """Build section `cls` from mapping `data` found at key path `where` (see the module docstring)."""
    ctx = ctx or ParseContext()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _bad(data, cls, where)
    data = cls._before(dict(data), where, ctx)
    accepted = _accepted_names(cls)
    inert_keys = getattr(cls, "_INERT", {})
    hints = _hints(cls)
    given: Dict[str, Tuple[str, Any]] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", where=where or "<top level>")
        if key in inert_keys:
            warn_ignored(join(where, key), inert_keys[key])
            continue
        name = accepted.get(key)
        if name is None:
            raise unknown_key_error(key, where, [k for k in list(accepted) + list(inert_keys) if not k.startswith("_")],
                                    removed=getattr(cls, "_REMOVED", None))
        if name in given:
            raise ConfigError(f"'{key}' and '{given[name][0]}' set the same option; keep one",
                              where=join(where, key))
        given[name] = (key, value)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        key, value = given[f.name]
        path = join(where, key)
        tp = hints[f.name]
        if isinstance(value, str) and value == "auto" and not _accepts_auto_literal(tp):
            value = _resolve_leftover_auto(f, path, ctx)
            if value is None:
                kwargs[f.name] = None
                continue
        choices = f.metadata.get("choices")
        if choices and isinstance(value, str):
            lowered = {c.lower(): c for c in choices}
            if value.lower() not in lowered:
                guess = did_you_mean(value, choices)
                raise ConfigError(f"invalid value {value!r}; expected one of {', '.join(choices)}"
                                  + (f" (did you mean '{guess}'?)" if guess else ""), where=path)
            value = lowered[value.lower()]
        value = convert(value, tp, path, ctx)
        check = f.metadata.get("check")
        if check is not None:
            value = check(value, path)
        if f.metadata.get("inert") and _is_active(value, _default_of(f)):
            warn_ignored(path, f.metadata["inert"])
        kwargs[f.name] = value
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ConfigError(f"missing required key '{f.name}'", where=join(where, f.name))
    obj = cls(**kwargs)
    obj._check(where)
    return obj


def _default_of(f):
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _is_active(value, default) -> bool:
    """Whether an inert key's value would change anything in DeepSpeed ([Note: inert keys])."""
    if value is None or value == default:
        return False
    enabled = value.get("enabled") if isinstance(value, (Mapping, Section)) else None
    if enabled is not None:
        return bool(enabled)
    return not (isinstance(value, Mapping) and not value)


def _accepts_auto_literal(tp) -> bool:
    if typing.get_origin(tp) is typing.Literal:
        return "auto" in typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        return any(_accepts_auto_literal(a) for a in typing.get_args(tp))
    return False
