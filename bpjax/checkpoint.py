"""Checkpoints behind one pair of functions: save, and restore the latest.

Orbax writes each checkpoint into a temporary directory and renames it into
place only once complete, so a crash never leaves a half-written checkpoint that
``restore_latest`` would pick up. With several processes, all of them take part
in a save (Orbax synchronises them), but only process 0 writes: the training
state is replicated, and Orbax's default of spreading a replicated array's
bytes over the processes that hold a replica ("replica-parallel" saving) is
turned off, so the copy of replica 0, on process 0, is the one written.

Each checkpoint carries the architecture it was made for; restoring into
another architecture is refused with a clear error instead of a shape error
deep inside Orbax.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from bpjax.errors import CheckpointError

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

# Orbax is imported inside the functions: importing it defines absl flags, and
# importing bpjax must define none (notebooks re-run cells; see tests).

__all__ = ["CheckpointError", "checkpoint_manager", "restore_latest", "save_checkpoint"]


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
    manager: ocp.CheckpointManager, target: Any, meta: dict[str, Any]
) -> tuple[Any, int] | None:
    """Restores the newest checkpoint into the structure of ``target``.

    Returns ``(state, epoch)``, or ``None`` when there is no checkpoint. Raises
    :class:`CheckpointError` when the checkpoint's ``meta`` (architecture,
    dtype, optimizer) differs from this run's.
    """
    import orbax.checkpoint as ocp

    manager.wait_until_finished()
    epoch = manager.latest_step()
    if epoch is None:
        return None
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
    return restored["state"], epoch
