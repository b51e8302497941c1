"""Checks shared by every settings dataclass: types from annotations, choices, numbers.

A ``Config`` (or a benchmark's settings) reaches bpjax from absl flags, which are
typed, but also from JSON (``--config``, a run's ``config.json``) and from
notebooks, which can hand any value to any key: ``{"lr": true}`` would pass
Python's ``isinstance(True, int)`` and train at lr 1; ``"momentum": "0.5"`` or
``"hidden": 500`` would fail deep inside JAX with a ``TypeError``.
:func:`check_types` refuses both in one line naming the setting, the value and
the type it needs, before any other check reads the value. Here too: ``setting``
(a field with its flag help, choices, resumability) and ``read_record`` (the JSON
of a run's settings), for ``Config`` and every benchmark's settings alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import reprlib
import types
import typing
from typing import Any

from bpjax.errors import ConfigError, first_line

_WRONG = object()  # what _typed returns for a value of the wrong type
_NONE = type(None)
_short = reprlib.Repr()  # a long value shortened with "...", so the message stays a line
_short.maxstring = _short.maxother = 40


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(settings: Any) -> None:
    """Every field of the frozen dataclass ``settings`` holds a value of its annotated type.

    Normalizes in place what is the right kind in another form: a list (JSON,
    notebooks) becomes the tuple a ``tuple[...]`` field needs, so the settings
    stay hashable (a ``jax.jit`` static argument); a NumPy scalar becomes the
    Python number (JSON cannot write it); an integer in a float field becomes a
    float. A bool is never a number here, though Python says ``True == 1``.
    """
    for field in dataclasses.fields(settings):
        value, hint = getattr(settings, field.name), _hints(type(settings))[field.name]
        typed = _typed(value, hint)
        if typed is _WRONG:
            raise ConfigError(
                f"--{field.name}={_short.repr(value)} has the wrong type: expected"
                f" {_expected(hint)}, got {_kind(value)}"
            )
        if typed is not value:
            object.__setattr__(settings, field.name, typed)


def _kind(value: Any) -> str:
    """``value``'s type name; for a list, its items' too ("list of str")."""
    name = type(value).__name__
    if isinstance(value, tuple | list) and value:
        return f"{name} of {', '.join(sorted({type(v).__name__ for v in value}))}"
    return name


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (see :func:`check_types`), or ``_WRONG``."""
    if hint is Any:
        return value
    union = _union_args(hint)
    if union is not None:
        for arg in sorted(union, key=lambda a: a is not _NONE):  # None first: exact
            typed = _typed(value, arg)
            if typed is not _WRONG:
                return typed
        return _WRONG
    if hint is _NONE:
        return None if value is None else _WRONG
    if hint is bool:
        return value if isinstance(value, bool) else _WRONG
    if isinstance(value, bool):  # NumPy's bool is no number either (not numbers.Real)
        return _WRONG
    if hint is int:
        return int(value) if isinstance(value, numbers.Integral) else _WRONG
    if hint is float:
        if not isinstance(value, numbers.Real):
            return _WRONG
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: the range checks refuse inf
            return math.inf
    if typing.get_origin(hint) is tuple:
        return _typed_tuple(value, typing.get_args(hint))
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _WRONG
    return value  # an annotation this checker does not know: trust it


def _typed_tuple(value: Any, args: tuple[Any, ...]) -> Any:
    if not isinstance(value, tuple | list):
        return _WRONG
    items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    if len(items) != len(value):
        return _WRONG
    typed = tuple(_typed(v, t) for v, t in zip(value, items, strict=True))
    if any(t is _WRONG for t in typed):
        return _WRONG
    same = isinstance(value, tuple) and all(t is v for t, v in zip(typed, value, strict=True))
    return value if same else typed


def _expected(hint: Any) -> str:
    """``hint`` in words: ``tuple[int, ...] | None`` -> "a list of integers or None"."""
    union = _union_args(hint)
    if union is not None:
        return " or ".join(_expected(a) for a in sorted(union, key=lambda a: a is _NONE))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], _expected(args[0]))}"
        return f"a list of {len(args)}: {', '.join(_expected(a) for a in args)}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             _NONE: "None"}  # fmt: skip
    return names.get(hint, getattr(hint, "__name__", str(hint)))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


# ------------------------------------------------------------------- fields and records


def setting(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, resumable: bool = False
) -> Any:
    """A dataclass field with its flag help and allowed values (read by ``bpjax.cli``).

    ``resumable``: a resumed run may change it, because it does not alter the
    computation (how long the run goes, how often it saves, where its files
    live, which devices run it).
    """
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "resumable": resumable}
    )


def source_name(source: object) -> str:
    """How an error names where settings came from: the file's path, or "JSON"."""
    return source if isinstance(source, str) and not source.lstrip().startswith("{") else "JSON"


def read_record(source: str) -> dict[str, Any]:
    """JSON text, or the path of a config.json or of the run directory holding one."""
    if source.lstrip().startswith("{"):
        text = source
    else:
        path = os.path.join(source, "config.json") if os.path.isdir(source) else source
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the config {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:  # JSON is UTF-8 (RFC 8259); bpjax writes ASCII
            raise ConfigError(f"{path} is not UTF-8 text, so not JSON: byte {e.start} is"
                              f" 0x{e.object[e.start]:02x}") from None  # fmt: skip
    try:
        record = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise ConfigError(f"{source_name(source)} is not valid JSON: {first_line(e)}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{source_name(source)} must hold a JSON object of settings")
    return record


# ------------------------------------------------------------------- values
# Used by Config and by the benchmarks' settings, so a value means and is checked
# the same everywhere.


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of: {', '.join(choices)}")


def check_choices(name: str, values: tuple[str, ...], choices: tuple[str, ...]) -> None:
    """Every one of ``values`` (a list flag) is in ``choices``, and there is at least one."""
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ConfigError(
            f"--{name}={','.join(map(str, values))!r}: {', '.join(map(repr, bad)) or 'empty'}"
            f" is not one of: {', '.join(choices)}"
        )


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def check_positive_float(name: str, value: object) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a finite number > 0, got {value!r}")


def check_batch_divides(batch: int, num_devices: int, over: str | None = None) -> None:
    """Every device gets batch / num_devices rows: the batch must divide.

    ``over`` names the devices in the error (default ``--num_devices=N``).
    """
    if batch % num_devices:
        raise ConfigError(
            f"--batch={batch} does not divide over {over or f'--num_devices={num_devices}'}:"
            f" use a batch that is a multiple of {num_devices}"
        )


def check_hidden(hidden: tuple[int, ...], name: str = "hidden") -> None:
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ConfigError(
            f"--{name} must be a comma list of positive widths like 500 or 256,128, "
            f"got {hidden!r}"
        )


def check_sizes(sizes: tuple[int, ...]) -> None:
    """Layer widths ``(n_0, ..., n_L)``: at least two, all positive."""
    if len(sizes) < 2:
        raise ConfigError(f"--sizes must be at least two widths n_0,...,n_L, got {sizes!r}")
    check_hidden(sizes, name="sizes")
