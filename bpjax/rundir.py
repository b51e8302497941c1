"""A run's directory: the record of one training run, and its log lines.

    <workdir>/config.json     the run's settings and layer sizes, written when it starts
    <workdir>/metrics.jsonl   one JSON object per epoch, appended as each epoch ends
    <workdir>/checkpoints/    Orbax checkpoints of the training state (``bpjax.checkpoint``)

A notebook reads a run back with ``read_metrics(workdir)``. Each metrics record
holds ``epoch``, ``step`` (optimizer steps so far), ``train_loss`` and
``train_accuracy`` (averaged over the epoch's steps, each taken before its
update), ``test_loss`` and ``test_accuracy`` (after the epoch; accuracy is None
without classes), ``samples_per_s`` and ``epoch_s`` (the epoch's training
loop, evaluation apart) and ``elapsed_s`` (since the run started, compilation
and any earlier part of a resumed run included).

``metrics.jsonl`` is appended, one whole line per epoch written with a single
``write`` and fsynced, so ``tail -f`` follows a run; a resume rewrites it once,
atomically, keeping only the epochs its checkpoint covers. A reader skips a
last line cut short by a crash. With several processes only process 0 writes
files and logs; every process takes part in checkpoint saves (Orbax
synchronises them).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bpjax.checkpoint import checkpoint_manager, restore_latest, save_checkpoint
from bpjax.config import Config
from bpjax.errors import ConfigError, RunError
from bpjax.files import write_atomic

Log = Callable[[str], None]
METRICS = "metrics.jsonl"


def default_workdir(config: Config) -> str:
    """``runs/<date>-<time>-<dataset>-<method>-b<batch>``, relative to the working directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.dataset}-{config.method}-b{config.batch}")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch records of a run, one dict per line of ``metrics.jsonl``.

    A run that has not finished an epoch yet gives ``[]``; a directory that
    does not exist raises :class:`~bpjax.errors.RunError`.
    """
    if not os.path.isdir(workdir):
        raise RunError(f"no run directory at {workdir}")
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut short by a crash mid-write
                break
            raise RunError(f"{path}: line {i + 1} is not JSON") from None
    return records


def format_line(record: dict[str, Any], epochs: int, eta_s: float) -> str:
    """The progress line of one epoch."""
    parts = [
        f"epoch {record['epoch']:>3}/{epochs}",
        f"step {record['step']}",
        f"loss {record['train_loss']:.4f}",
    ]
    if record.get("train_accuracy") is not None:
        parts.append(f"train_acc {100 * record['train_accuracy']:.2f}%")
    parts.append(f"test_loss {record['test_loss']:.4f}")
    if record.get("test_accuracy") is not None:
        parts.append(f"test_acc {100 * record['test_accuracy']:.2f}%")
    parts += [
        f"{record['samples_per_s'] / 1e3:.1f}k samples/s",
        f"epoch {record['epoch_s']:.2f}s",
        f"elapsed {record['elapsed_s']:.1f}s",
        f"ETA {eta_s:.1f}s",
    ]
    return "  ".join(parts)


class RunDir:
    """One run's directory, open for the length of the run (a context manager).

    ``open`` refuses to start over a run that has checkpoints unless the
    config resumes it; ``resume`` restores the latest checkpoint; ``start``
    writes ``config.json``; ``end_epoch`` checkpoints, appends the metrics
    record and logs its line; ``close`` waits for the last checkpoint and
    closes the manager, on every exit path.
    """

    def __init__(self, config: Config, workdir: str, log: Log, is_main: bool) -> None:
        self.config, self.workdir, self.log, self.is_main = config, workdir, log, is_main
        self.manager = checkpoint_manager(workdir, keep=config.keep_checkpoints)
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[float] = []
        self.t_start = time.perf_counter()
        self._elapsed_before = 0.0  # seconds the run had already taken before a resume

    @classmethod
    def open(cls, config: Config, *, log: Log, is_main: bool = True) -> RunDir:
        workdir = config.workdir or default_workdir(config)
        checkpoints = os.path.join(workdir, "checkpoints")
        if not config.resume and os.path.isdir(checkpoints) and os.listdir(checkpoints):
            raise ConfigError(
                f"--workdir={workdir} already holds checkpoints: pass --resume to continue that"
                " run, or choose a new --workdir"
            )
        return cls(config, workdir, log, is_main)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def resume(self, state: Any, meta: dict[str, Any]) -> tuple[Any, int]:
        """``(state, epoch)`` of the latest checkpoint, or ``(state, 0)`` unchanged.

        Without ``config.resume`` nothing is restored. The metrics of epochs the
        checkpoint does not cover are dropped (they are recomputed).
        """
        restored = restore_latest(self.manager, state, meta) if self.config.resume else None
        if restored is None:
            self._rewrite_metrics()
            return state, 0
        state, epoch = restored
        self.history = [m for m in read_metrics(self.workdir) if m["epoch"] <= epoch]
        self._elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        self._rewrite_metrics()
        self.log(f"resumed {self.workdir} from the checkpoint of epoch {epoch}")
        return state, epoch

    def start(self, sizes: tuple[int, ...]) -> None:
        """Writes ``config.json``: the settings, the layer sizes and the workdir."""
        if self.is_main:
            record = {**self.config.to_dict(), "sizes": list(sizes), "workdir": self.workdir}
            write_atomic(self.path("config.json"), json.dumps(record, indent=2) + "\n")

    def elapsed_s(self) -> float:
        return self._elapsed_before + time.perf_counter() - self.t_start

    def end_epoch(self, state: Any, record: dict[str, Any], meta: dict[str, Any]) -> None:
        """Checkpoint (when due), metrics line, log line: the end of one epoch."""
        epoch, config = record["epoch"], self.config
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            save_checkpoint(self.manager, epoch, state, meta)
        self.history.append(record)
        self.epoch_times.append(record["epoch_s"])
        if self.is_main:
            self._append_metrics(record)
        eta = float(np.median(self.epoch_times)) * (config.epochs - epoch)
        self.log(format_line(record, config.epochs, eta))

    def last_checkpoint(self) -> int | None:
        """The epoch of the newest checkpoint on disk (after pending saves finish)."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def summary(self, loop_s: float) -> str:
        """The closing log line."""
        last = self.history[-1]
        acc = last.get("test_accuracy")
        median = np.median(self.epoch_times) if self.epoch_times else float("nan")
        return (
            f"done: {len(self.history)} epochs, test "
            + (f"accuracy {100 * acc:.2f}%" if acc is not None else f"loss {last['test_loss']:.5f}")
            + f", median epoch {median:.3f}s, training loop {loop_s:.1f}s, whole run "
            f"{time.perf_counter() - self.t_start:.1f}s; metrics in {self.path(METRICS)}"
        )

    def _rewrite_metrics(self) -> None:
        if self.is_main:
            lines = "".join(json.dumps(m) + "\n" for m in self.history)
            write_atomic(self.path(METRICS), lines)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        fd = os.open(self.path(METRICS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())  # one write: one whole line
            os.fsync(fd)
        finally:
            os.close(fd)
