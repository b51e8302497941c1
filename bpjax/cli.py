"""The one bridge from absl flags to a frozen settings dataclass, for entry points only.

    define_flags(Config)            # at module level of launch.py (or a script)
    config = from_flags(Config)     # inside main(), after absl parsed argv

Every field of the dataclass becomes a flag of the same name, typed from its
annotation: ``bool`` -> ``DEFINE_bool``, ``int`` / ``float`` -> ``DEFINE_integer``
/ ``DEFINE_float``, ``str`` with ``choices`` in the field's metadata ->
``DEFINE_enum`` (so ``--help`` lists them), other ``str`` -> ``DEFINE_string``,
``tuple[...]`` -> ``DEFINE_list``. ``X | None`` fields default to None. The
help text is the field's ``metadata["help"]``; a field whose flag syntax is its
own (e.g. ``method=batch`` pairs) gives ``metadata["parse"]`` (list of strings
-> value) and ``metadata["format"]`` (value -> list of strings).

Importing this module defines no flag; only calling :func:`define_flags` does,
and only entry points call it (a library module that did would break notebooks,
which re-run cells). :func:`run` wraps ``absl.app.run`` the way every entry point
needs: JAX's own flags (``--jax_platforms``, ``--jax_enable_x64``, ...) are
accepted, and a :class:`~bpjax.errors.BpjaxError` becomes one ``error:`` line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from absl import app, flags, logging

from bpjax.errors import BpjaxError, ConfigError

T = TypeVar("T")


def _field_type(hint: Any) -> Any:
    """The base type of an annotation like ``int | None`` (``int``) or ``tuple[int, ...]``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base
    return hint


def define_flags(cls: type, *, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per field of the dataclass ``cls`` (see the module docstring).

    The flags belong to the calling module, so its ``--help`` lists them.
    """
    module_name = sys._getframe(1).f_globals.get("__name__", "__main__")
    if module_name == "__main__":  # absl names the main module by its path
        module_name = sys.argv[0]
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        base = _field_type(hints[field.name])
        meta = field.metadata
        help_text = meta.get("help", field.name)
        choices = meta.get("choices")
        default = field.default
        kw = {"name": field.name, "help": help_text, "flag_values": flag_values,
              "module_name": module_name}  # fmt: skip
        if "format" in meta:
            value = None if default is None else meta["format"](default)
            flags.DEFINE_list(default=value, **kw)
        elif typing.get_origin(base) is tuple:
            value = None if default is None else [str(v) for v in default]
            if choices:
                kw["help"] = f"{help_text} Any of: {', '.join(choices)}."
            flags.DEFINE_list(default=value, **kw)
        elif base is bool:
            flags.DEFINE_bool(default=default, **kw)
        elif base is int:
            flags.DEFINE_integer(default=default, **kw)
        elif base is float:
            flags.DEFINE_float(default=default, **kw)
        elif base is str and choices:
            flags.DEFINE_enum(default=default, enum_values=list(choices), **kw)
        elif base is str:
            flags.DEFINE_string(default=default, **kw)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no flag type for {hints[field.name]}")


def _from_list(name: str, items: list[str], base: Any, meta: Any) -> Any:
    if "parse" in meta:
        return meta["parse"](items)
    (item_type, *_) = typing.get_args(base)
    try:
        return tuple(item_type(v) for v in items)
    except ValueError:
        kind = "integers" if item_type is int else f"{item_type.__name__} values"
        raise ConfigError(
            f"--{name} must be a comma list of {kind}, got {','.join(items)!r}"
        ) from None


def from_flags(
    cls: type[T], *, flag_values: flags.FlagValues = flags.FLAGS, defaults: T | None = None
) -> T:
    """Builds ``cls`` from the parsed flags its fields define.

    With ``defaults`` (an instance of ``cls``, e.g. a recorded run's settings),
    only the flags given on the command line replace its values. Raises the
    dataclass's own validation errors (``ConfigError``), so a bad value gets
    the same one-line message as in a notebook.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if defaults is not None and not flag_values[field.name].present:
            values[field.name] = getattr(defaults, field.name)
            continue
        value = flag_values[field.name].value
        base = _field_type(hints[field.name])
        if value is not None and ("parse" in field.metadata or typing.get_origin(base) is tuple):
            value = _from_list(field.name, value, base, field.metadata)
        values[field.name] = value
    return cls(**values)


def run(
    main: Callable[[list[str]], None], *, positional: bool = False, verbosity: int | None = None
) -> None:
    """``absl.app.run(main)`` with JAX's flags and one-line errors (see the module docstring).

    ``positional``: ``main`` takes arguments besides flags (else they are refused).
    ``verbosity``: the absl log level unless ``--verbosity`` is given. app.run turns on
    INFO, where Orbax logs ~40 lines per checkpoint (and, at ERROR, a traceback for a
    damaged checkpoint or a failed write that bpjax reports in one line of its own).
    """
    import jax

    jax.config.config_with_absl()
    sys.unraisablehook = _drop_checkpoint_noise

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1 and not positional:  # a usage error, as absl's own: status 2
            print(f"error: unexpected arguments {argv[1:]}: flags take the form --name=value",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
        if verbosity is not None and not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(verbosity)
        try:
            main(argv)
        except BpjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=_parse_flags)


def _drop_checkpoint_noise(unraisable: sys.UnraisableHookArgs) -> None:
    """Python's default unraisable hook, minus the leftovers of a failed checkpoint I/O.

    When a checkpoint write fails (a full disk) or a read fails (a damaged file),
    Orbax stops at the first error while its other TensorStore operations are in
    flight: their coroutines are abandoned mid-raise and their completion
    callbacks hit a closed asyncio loop ("Event loop is closed"). Python can only
    print those as unraisable tracebacks. bpjax has already reported the failure
    in one line, or recovered from it, so they are dropped; any other unraisable
    exception is printed as usual.
    """
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    from_orbax = any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)
    closed_loop = unraisable.exc_type is RuntimeError and "Event loop is closed" in str(
        unraisable.exc_value
    )
    if not (from_orbax or closed_loop):
        sys.__unraisablehook__(unraisable)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with its errors as one ``error:`` line (absl prints two)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
        sys.exit(2)
