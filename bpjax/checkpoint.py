"""Checkpoints behind one pair of functions: save, and restore the newest intact one.

Orbax writes each checkpoint into a temporary directory and renames it into
place only once complete, so a crash never leaves a half-written checkpoint that
``restore_latest`` would pick up. A checkpoint damaged later (a truncated or
lost file) is detected when it is read: ``restore_latest`` names it in a
warning, moves it aside (``<workdir>/damaged/``, kept for inspection; a new
checkpoint of that epoch can then be written) and falls back to the one
before. With several processes, all of them take part
in a save (Orbax synchronises them), but only process 0 writes: the training
state is replicated, and Orbax's default of spreading a replicated array's
bytes over the processes that hold a replica ("replica-parallel" saving) is
turned off, so the copy of replica 0, on process 0, is the one written.

Each checkpoint carries, in its ``meta`` item (JSON, written with the state
and renamed into place with it), what it must match to be restored: the
architecture, and ``settings``, the run's settings a resume may not change
(``run_settings``). Restoring into another architecture is refused
with a clear error instead of a shape error deep inside Orbax; settings that
differ from the checkpoint's are refused naming each one (``config.json`` was
edited after the run started). A checkpoint made before settings were recorded
has none: nothing to compare, ``config.json`` is trusted.

``meta`` also holds ``checksums``: the CRC-32 of every array's bytes, taken at
save time. A restored array whose bytes differ (a file corrupted in place: same
size, other bytes, which Orbax reads without complaint) makes the checkpoint
damaged, handled exactly as a truncated one. And ``epoch``: where the state is,
which for the end of a run stopped part-way through an epoch (a target reached
under ``--eval_every_steps``) is a fraction, e.g. 1.5, saved under the epoch
under way (2); without it the checkpoint's number is its epoch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bpjax.errors import CheckpointError, ConfigError, first_line

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

    from bpjax.config import Config

# Orbax is imported inside the functions: importing it defines absl flags, and
# importing bpjax must define none (notebooks re-run cells; see tests).

__all__ = [
    "CheckpointError", "checkpoint_manager", "restore_epoch", "restore_latest", "save_checkpoint"
]


class ChecksumError(Exception):
    """A restored array differs from the bytes saved: the checkpoint is damaged.

    Not a :class:`CheckpointError` (that one means "made for another run" and
    stops the search): a damaged checkpoint is skipped for the one before it.
    """


def refuse_unrecorded(workdir: str, record: str) -> None:
    """Refuses to resume checkpoints whose run lost its record of settings, ``record``.

    Flags (or ``--config``) would stand in for the settings the checkpoints were
    made with, and a run would go on with other ones, silently. Orbax names a
    finished checkpoint by its number; a directory without one is a run to start.
    """
    directory = os.path.join(workdir, "checkpoints")
    if os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory)):
        raise ConfigError(
            f"--resume: {workdir} holds checkpoints but no {record}, the record of the run's"
            f" settings (flags or --config cannot stand in for it): restore {workdir}/{record}"
            " from a copy of the run, or start a new run in another --workdir"
        )


def checkpoint_manager(
    workdir: str, *, keep: int = 2, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager for ``<workdir>/checkpoints`` keeping the newest ``keep``.

    ``read_only``: for readers (``load_run``, which never saves): it creates nothing,
    and would delete nothing (Orbax's own ``read_only`` logs a warning per manager).
    """
    import jax
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        *[(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types()],
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),  # process 0 writes
    )
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                           create=not read_only)  # fmt: skip
    item_handlers = {
        "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def run_settings(config: Config) -> dict[str, Any]:
    """The settings a resume may not change, as JSON values: what a checkpoint records.

    The fields ``Config.differences`` compares: the non-resumable ones, and
    ``epochs`` under a cosine schedule (it sets every step's learning rate).
    """
    fixed = {f.name for f in dataclasses.fields(config) if not f.metadata.get("resumable")}
    if "cosine" in config.lr_schedule:
        fixed.add("epochs")
    return {k: v for k, v in json.loads(config.to_json()).items() if k in fixed}


def checksums(state: Any) -> dict[str, int]:
    """The CRC-32 of each array's bytes in ``state``, by its path (``params/0/W``).

    The path names keys, attributes and indices alike, so a state restored as
    dicts (a reader without the training's types) has the same paths. A
    ``jax.Array`` is read from its first local device: the training state is
    replicated, so that is the whole array, on every process.
    """
    import jax
    import numpy as np

    def crc(leaf: Any) -> int:
        local = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
        return zlib.crc32(np.ascontiguousarray(np.asarray(local)).tobytes())

    def name(entry: Any) -> str:
        for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {"/".join(map(name, path)): crc(leaf) for path, leaf in flat}


def save_checkpoint(
    manager: ocp.CheckpointManager, epoch: int | float, state: Any, meta: dict[str, Any]
) -> None:
    """Saves ``state`` (any pytree of arrays) at ``epoch`` as checkpoint ``ceil(epoch)``.

    ``meta`` is saved beside it, with the ``epoch`` and the ``checksums`` of the
    arrays added. A checkpoint already under that number (the end of a run that
    stopped part-way through this epoch, now resumed) is replaced. Asynchronous:
    call ``manager.wait_until_finished()`` before relying on it being on disk.
    """
    import orbax.checkpoint as ocp

    step = math.ceil(epoch)
    if step in manager.all_steps():
        manager.wait_until_finished()
        manager.delete(step)
    meta = {**meta, "epoch": epoch, "checksums": checksums(state)}
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    target: Any,
    meta: dict[str, Any],
    warn: Callable[[str], None] = lambda line: None,
    up_to: float | None = None,
) -> tuple[Any, int | float] | None:
    """Restores the newest intact checkpoint (of an epoch ``<= up_to``) into ``target``'s structure.

    Returns ``(state, epoch)`` (``epoch`` as the checkpoint records it, see the
    module docstring), or ``None`` when there is no checkpoint. A checkpoint that
    cannot be read, or whose arrays fail their checksums, is reported through
    ``warn`` (one line), moved aside, and the one before it is tried. Raises
    :class:`CheckpointError` when the checkpoints are made for another run
    (architecture, dtype, optimizer: ``meta`` differs) or none is intact.
    """
    manager.wait_until_finished()
    steps = tuple(s for s in manager.all_steps() if up_to is None or s <= math.ceil(up_to))
    if not steps:
        return None

    def move_aside(epoch: int, e: Exception) -> None:
        aside = _move_aside(manager, epoch)
        warn(f"warning: checkpoint {manager.directory}/{epoch} cannot be read"
             f" ({type(e).__name__}: {first_line(e)}); moved to {aside}, using the one before it")

    found = newest_intact(manager, steps, target, meta, on_damaged=move_aside, up_to=up_to)
    if found is not None:
        return found
    manager.reload()
    raise CheckpointError(
        f"no intact checkpoint in {manager.directory} (every one of epochs"
        f" {', '.join(map(str, sorted(steps)))} was damaged, now in"
        f" {_aside_dir(manager)}): start the run again in a new --workdir"
    )


def newest_intact(
    manager: ocp.CheckpointManager,
    steps: Iterable[int],
    target: Any,
    meta: dict[str, Any],
    on_damaged: Callable[[int, Exception], None],
    up_to: float | None = None,
) -> tuple[Any, int | float] | None:
    """``(state, epoch)`` of the newest of ``steps`` that restores, or None if none does.

    A checkpoint made for another run raises :class:`CheckpointError` at once; a
    damaged one is handed to ``on_damaged(step, error)`` and the one before it tried;
    one of an epoch past ``up_to`` (checkpoint 2 holds epoch 2, not 1.5) is passed over.
    """
    for step in sorted(steps, reverse=True):
        try:
            state, epoch = restore_step(manager, step, target, meta)
        except CheckpointError:
            raise
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            on_damaged(step, e)
            continue
        if up_to is None or epoch <= up_to:
            return state, epoch
    return None


def restore_epoch(
    manager: ocp.CheckpointManager, epoch: int, target: Any, meta: dict[str, Any]
) -> Any:
    """Checkpoint ``epoch`` restored into the structure of ``target`` (see ``restore_step``)."""
    return restore_step(manager, epoch, target, meta)[0]


def restore_step(
    manager: ocp.CheckpointManager, step: int, target: Any, meta: dict[str, Any]
) -> tuple[Any, int | float]:
    """``(state, epoch)`` of checkpoint ``step``, restored into the structure of ``target``.

    Raises CheckpointError if it was made for another run or with other settings
    (``meta`` differs); ChecksumError if an array's bytes differ from those saved;
    a checkpoint damaged otherwise raises whatever Orbax raises.
    """
    import orbax.checkpoint as ocp

    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    where = f"checkpoint {manager.directory}/{step}"
    _check_settings(where, saved.get("settings"), meta.get("settings"))
    diffs = [f"{k}={saved.get(k)!r} (this run: {v!r})" for k, v in meta.items()
             if k != "settings" and saved.get(k) != v]  # fmt: skip
    if diffs:
        raise CheckpointError(
            f"{where} was made for another run: {'; '.join(diffs)}."
            " Use a new --workdir, or the flags the checkpoint was made with"
        )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args)),
    )["state"]
    recorded = saved.get("checksums")  # None: made before checksums were recorded
    if recorded is not None:
        bad = [k for k, crc in checksums(restored).items() if recorded.get(k, crc) != crc]
        if bad:
            raise ChecksumError(
                f"{', '.join(bad)} differ from the bytes saved (CRC-32): corrupted on disk"
            )
    return restored, saved.get("epoch", step)


def _check_settings(where: str, saved: dict[str, Any] | None, given: dict[str, Any] | None) -> None:
    """Refuses settings that contradict those the checkpoint was made with.

    A checkpoint without settings (made by an older bpjax), or a setting one side
    does not know (another version's field), is not compared: the record is trusted.
    """
    if not saved or not given:
        return
    differ = sorted(k for k in saved.keys() & given.keys() if saved[k] != given[k])
    if differ:
        listed = "; ".join(f"--{k}: checkpoint {saved[k]!r}, config.json {given[k]!r}"
                           for k in differ)  # fmt: skip
        raise CheckpointError(
            f"{where} was made with other settings than the run's config.json says: {listed}."
            " config.json was changed after the run started: put the recorded values back"
            " (or start a new run in another --workdir)"
        )


def _aside_dir(manager: ocp.CheckpointManager) -> str:
    return os.path.join(os.path.dirname(str(manager.directory)), "damaged")


def _move_aside(manager: ocp.CheckpointManager, epoch: int) -> str:
    """Moves checkpoint ``epoch`` to ``<workdir>/damaged/<epoch>-<time>``; returns the path.

    Only process 0 moves files (the others see the same damage and skip it too).
    """
    import jax

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(_aside_dir(manager), f"{epoch}-{stamp}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(str(manager.directory), str(epoch)), dest)
        manager.reload()
    return dest
