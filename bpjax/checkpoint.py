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

Each checkpoint carries the architecture it was made for; restoring into
another architecture is refused with a clear error instead of a shape error
deep inside Orbax.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bpjax.errors import CheckpointError, first_line

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

# Orbax is imported inside the functions: importing it defines absl flags, and
# importing bpjax must define none (notebooks re-run cells; see tests).

__all__ = [
    "CheckpointError", "checkpoint_manager", "restore_epoch", "restore_latest", "save_checkpoint"
]


def checkpoint_manager(workdir: str, *, keep: int = 2) -> ocp.CheckpointManager:
    """A manager for ``<workdir>/checkpoints`` keeping the newest ``keep``."""
    import jax
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        *[(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types()],
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),  # process 0 writes
    )
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    item_handlers = {
        "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def save_checkpoint(
    manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict[str, Any]
) -> None:
    """Saves ``state`` (any pytree of arrays) as checkpoint ``epoch``; asynchronous.

    Call ``manager.wait_until_finished()`` before relying on it being on disk.
    """
    import orbax.checkpoint as ocp

    manager.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    target: Any,
    meta: dict[str, Any],
    warn: Callable[[str], None] = lambda line: None,
) -> tuple[Any, int] | None:
    """Restores the newest intact checkpoint into the structure of ``target``.

    Returns ``(state, epoch)``, or ``None`` when there is no checkpoint. A
    checkpoint that cannot be read is reported through ``warn`` (one line),
    moved aside, and the one before it is tried. Raises
    :class:`CheckpointError` when the checkpoints are made for another run
    (architecture, dtype, optimizer: ``meta`` differs) or none is intact.
    """
    manager.wait_until_finished()
    steps = tuple(manager.all_steps())
    if not steps:
        return None

    def move_aside(epoch: int, e: Exception) -> None:
        aside = _move_aside(manager, epoch)
        warn(f"warning: checkpoint {manager.directory}/{epoch} cannot be read"
             f" ({type(e).__name__}: {first_line(e)}); moved to {aside}, using the one before it")

    found = newest_intact(manager, steps, target, meta, on_damaged=move_aside)
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
) -> tuple[Any, int] | None:
    """``(state, epoch)`` of the newest of ``steps`` that restores, or None if none does.

    A checkpoint made for another run raises :class:`CheckpointError` at once; a
    damaged one is handed to ``on_damaged(epoch, error)`` and the one before it tried.
    """
    for epoch in sorted(steps, reverse=True):
        try:
            return restore_epoch(manager, epoch, target, meta), epoch
        except CheckpointError:
            raise
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            on_damaged(epoch, e)
    return None


def restore_epoch(
    manager: ocp.CheckpointManager, epoch: int, target: Any, meta: dict[str, Any]
) -> Any:
    """Checkpoint ``epoch`` restored into the structure of ``target``.

    Raises CheckpointError if it was made for another run (``meta`` differs); a
    damaged checkpoint raises whatever Orbax raises.
    """
    import orbax.checkpoint as ocp

    saved = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    diffs = [
        f"{k}={saved.get(k)!r} (this run: {v!r})" for k, v in meta.items() if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{epoch} was made for another run: {'; '.join(diffs)}."
            " Use a new --workdir, or the flags the checkpoint was made with"
        )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args)),
    )
    return restored["state"]


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
