"""A run's directory: the record of one training run, and its log lines.

    <workdir>/config.json     the run's settings, layer sizes and provenance, written once
    <workdir>/metrics.jsonl   one JSON object per epoch, appended as each epoch ends
    <workdir>/events.jsonl    start, resumes (with what changed), interruptions, the end
    <workdir>/checkpoints/    Orbax checkpoints of the training state (``bpjax.checkpoint``)
    <workdir>/.lock           held by the one process writing the run (``bpjax.runlock``)

A notebook reads a run back with ``read_metrics(workdir)`` or
``bpjax.load_run(workdir)``. Each metrics record holds ``epoch``, ``step``
(optimizer steps so far), ``train_loss`` and ``train_accuracy`` (averaged over
the epoch's steps, each taken before its update), ``test_loss`` and
``test_accuracy`` (after the epoch; accuracy is None without classes),
``samples_per_s`` and ``epoch_s`` (the training of the interval the record
covers, evaluation apart: the epoch, or ``--eval_every_steps`` steps, when
``epoch`` is a fraction), ``train_s`` (all training so far, compilation and
evaluation excluded) and ``elapsed_s`` (since the run started, compilation and
any earlier part of a resumed run included); with a ``--target_*``,
``target_reached``; with ``--noise_scale``, ``b_simple``, ``grad_sq_norm`` and
``trace_sigma`` (McCandlish et al.'s estimates from the interval's averages of
S and |G_M|^2, ``bpjax.noise_scale``). Under a feedback rule other than bp, also
``alignment_deg`` (per hidden layer: the angle between the rule's dW^l and the
true gradient), ``delta_deg`` (the mean per-example angle between the rule's
and backprop's error signals) and, for fa and kp, ``weight_deg`` (W^{l+1} vs
B^{l+1}), all measured on a fixed batch (``bpjax.feedback.alignment``).

A resumed run is the same run: its ``config.json`` is never rewritten, and the
settings a resume may change (``Config`` fields marked resumable: epochs,
checkpoint cadence, devices, ...) are recorded as a ``resume`` event; any other
difference is refused before any work. ``metrics.jsonl`` is appended, one whole
line per epoch written with a single ``write`` and fsynced, so ``tail -f``
follows a run; a resume rewrites it once, atomically, keeping only the epochs
its checkpoint covers; a reader skips a last line cut short by a crash. A
failed write (disk full, ...) stops the run with one line; what was already on
disk stays intact. With several processes only process 0 writes files, takes
the lock and logs; every process takes part in checkpoint saves.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from bpjax.checkpoint import checkpoint_manager, restore_latest, save_checkpoint
from bpjax.config import Config
from bpjax.errors import BpjaxError, ConfigError, RunError, first_line
from bpjax.files import write_atomic
from bpjax.provenance import provenance
from bpjax.runlock import RunLock

Log = Callable[[str], None]
METRICS, EVENTS, CONFIG = "metrics.jsonl", "events.jsonl", "config.json"


def default_workdir(config: Config) -> str:
    """``runs/<date>-<time>-<dataset>-<method>-b<batch>``, relative to the working directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.dataset}-{config.method}-b{config.batch}")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a crash is skipped."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut short mid-write
                break
            raise RunError(f"{path}: line {i + 1} is not JSON") from None
    return records


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch records of a run, one dict per line of ``metrics.jsonl``.

    A run that has not finished an epoch yet gives ``[]``; a directory that
    does not exist raises :class:`~bpjax.errors.RunError`.
    """
    if not os.path.isdir(workdir):
        raise RunError(f"no run directory at {workdir}")
    path = os.path.join(workdir, METRICS)
    return read_jsonl(path) if os.path.exists(path) else []


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
    if record.get("alignment_deg"):
        parts.append("align " + "/".join(f"{a:.1f}" for a in record["alignment_deg"]) + "°")
    if "b_simple" in record:
        parts.append(f"B_simple {record['b_simple']:.4g}")
    parts += [
        f"{record['samples_per_s'] / 1e3:.1f}k samples/s",
        f"epoch {record['epoch_s']:.2f}s",
        f"elapsed {record['elapsed_s']:.1f}s",
        f"ETA {eta_s:.1f}s",
    ]
    return "  ".join(parts)


def _recorded(workdir: str) -> Config | None:
    path = os.path.join(workdir, CONFIG)
    return Config.from_json(path) if os.path.exists(path) else None


def _check_resume(config: Config, workdir: str, recorded: Config | None) -> None:
    """A new run must not overwrite a run; a resume must be the same run."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not config.resume and (recorded or (os.path.isdir(checkpoints) and os.listdir(checkpoints))):
        raise ConfigError(
            f"--workdir={workdir} already holds a run: pass --resume to continue it (with its"
            " recorded settings), or choose a new --workdir"
        )
    differ = recorded.differences(config) if (config.resume and recorded) else {}
    if differ:
        listed = "; ".join(f"--{k}: recorded {a!r}, given {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"--resume continues the run in {workdir} with its recorded settings, but these"
            f" differ: {listed}. Drop those flags, or start a new run in another --workdir"
        )


class RunDir:
    """One run's directory, open for the length of the run (a context manager).

    ``open`` checks the workdir (see :func:`_check_resume`) and takes its lock;
    ``resume`` restores the newest intact checkpoint (or starts the run);
    ``start`` writes ``config.json``; ``end_interval`` checkpoints, appends the
    metrics record and logs its line; ``close`` waits for the last checkpoint,
    closes the manager and releases the lock, on every exit path.
    """

    def __init__(self, config: Config, workdir: str, log: Log, is_main: bool,
                 recorded: Config | None, device: Any = None) -> None:  # fmt: skip
        self.config, self.workdir, self.log, self.is_main = config, workdir, log, is_main
        self.recorded, self.device = recorded, device  # the run's device (provenance)
        self.lock = RunLock.acquire(workdir, warn=log) if is_main else None
        try:
            with self._writing("the checkpoint directory"):
                self.manager = checkpoint_manager(workdir, keep=config.keep_checkpoints)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[float] = []
        self.saved_epoch = 0  # the newest epoch with a checkpoint (written or pending)
        self.resumed = False
        self.intervals_per_epoch = 1  # evaluations per epoch (--eval_every_steps)
        self.t_start = time.perf_counter()
        self._elapsed_before = 0.0  # seconds the run had already taken before a resume
        self._train_s = 0.0  # training seconds so far, compilation and evaluation excluded

    @classmethod
    def open(cls, config: Config, *, log: Log, is_main: bool = True, device: Any = None) -> RunDir:
        """The run directory of ``config``; ``device`` (the run's first) goes into provenance."""
        workdir = config.workdir or default_workdir(config)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise RunError(f"--workdir={workdir} is a file, not a directory: choose a directory")
        recorded = _recorded(workdir)
        _check_resume(config, workdir, recorded)
        return cls(config, workdir, log, is_main, recorded, device)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        # Already failing: close what can be closed and keep the error in flight.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Waits for the last checkpoint, closes the manager (its threads), frees the lock."""
        try:
            self._wait_saved()
            with self._writing(f"the checkpoint of epoch {self.saved_epoch}"):
                self.manager.close()
        finally:
            if self.lock:
                self.lock.release()

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turns a failed write into one line; files already written stay as they were."""
        try:
            yield
        except BpjaxError:
            raise
        except Exception as e:  # OSError, or Orbax/TensorStore wrapping one
            raise RunError(
                f"could not write {what} in {self.workdir} ({type(e).__name__}: {first_line(e)});"
                " the checkpoints and metrics already there are intact: free space (or fix the"
                f" file system) and continue with --workdir={self.workdir} --resume"
            ) from None

    def event(self, kind: str, **fields: Any) -> None:
        """Appends one event to ``events.jsonl`` (process 0)."""
        if self.is_main:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            self._append(EVENTS, {"event": kind, "time": now, **fields})

    def resume(self, state: Any, meta: dict[str, Any]) -> tuple[Any, int]:
        """``(state, epoch)`` of the newest intact checkpoint, or ``(state, 0)`` to start.

        The metrics of epochs the checkpoint does not cover are dropped (they
        are recomputed).
        """
        restored = None
        if self.config.resume:
            restored = restore_latest(self.manager, state, meta, warn=self._warn_damaged)
            if restored is None:
                self.log(f"no checkpoint in {self.workdir}: starting the run at epoch 1")
        if restored is None:
            self._rewrite_metrics()
            return state, 0
        state, epoch = restored
        self.resumed, self.saved_epoch = True, epoch
        self.history = [m for m in read_metrics(self.workdir) if m["epoch"] <= epoch]
        self._elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        self._train_s = self.history[-1].get("train_s", 0.0) if self.history else 0.0
        self._rewrite_metrics()
        changed = self.recorded.differences(self.config, resumable=True) if self.recorded else {}
        changed = {k: list(v) for k, v in changed.items() if k != "resume"}
        self.event("resume", epoch=epoch, changed=changed, provenance=provenance(self.device))
        self.log(f"resumed {self.workdir} from the checkpoint of epoch {epoch}")
        return state, epoch

    def _warn_damaged(self, line: str) -> None:
        self.event("checkpoint_damaged", detail=line)
        self.log(line)

    def start(self, sizes: tuple[int, ...]) -> None:
        """Writes ``config.json`` for a new run: settings, layer sizes, workdir, provenance.

        A resumed run keeps its record; one resumed before its first checkpoint
        keeps its ``config.json`` too and starts again at epoch 1.
        """
        if not self.is_main or self.resumed:
            return
        if not self.recorded:
            record = {**self.config.to_dict(), "sizes": list(sizes), "workdir": self.workdir,
                      "provenance": provenance(self.device)}  # fmt: skip
            with self._writing(CONFIG):
                write_atomic(self.path(CONFIG), json.dumps(record, indent=2) + "\n")
        self.event("start", epochs=self.config.epochs)

    def elapsed_s(self) -> float:
        return self._elapsed_before + time.perf_counter() - self.t_start

    def add_train_s(self, seconds: float) -> float:
        """Adds an interval's training time; returns the run's total so far."""
        self._train_s += seconds
        return self._train_s

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Checkpoints ``state`` as epoch ``epoch``.

        Asynchronous: a failed write of the previous save surfaces here (or at
        ``close``) as a RunError naming that epoch.
        """
        self._wait_saved()  # the next save would wait for it anyway
        with self._writing(f"the checkpoint of epoch {epoch}"):
            save_checkpoint(self.manager, epoch, state, meta)
        self.saved_epoch = epoch

    def end_interval(self, state: Any, record: dict[str, Any], meta: dict[str, Any],
                     epoch_end: bool = True) -> None:  # fmt: skip
        """Checkpoint (at an epoch's end, when due), metrics line, log line."""
        epoch, config = record["epoch"], self.config
        if epoch_end and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
            self.save(epoch, state, meta)
        self.history.append(record)
        self.epoch_times.append(record["epoch_s"])
        if self.is_main:
            self._append(METRICS, record)
        self.log(format_line(record, config.epochs, self._epoch_s() * (config.epochs - epoch)))

    def last_checkpoint(self) -> int | None:
        """The epoch of the newest checkpoint on disk (after pending saves finish)."""
        self._wait_saved()
        return self.manager.latest_step()

    def _wait_saved(self) -> None:
        """Waits for the pending checkpoint write; a failed one is one line (``_writing``)."""
        with self._writing(f"the checkpoint of epoch {self.saved_epoch}"):
            self.manager.wait_until_finished()

    def _epoch_s(self) -> float:
        """The median interval's seconds times intervals per epoch: a typical epoch."""
        return float(np.median(self.epoch_times)) * self.intervals_per_epoch

    def summary(self, loop_s: float, target: dict[str, Any] | None = None) -> str:
        """The closing log line (and where the target was reached, if it was)."""
        last = self.history[-1]
        acc = last.get("test_accuracy")
        median, reached = "", ""
        if self.epoch_times:
            median = f", median epoch {self._epoch_s():.3f}s"
        if target:
            reached = (f"; target reached at epoch {target['epoch']}, step {target['step']}, after"
                       f" {target['train_s']:.1f}s of training ({target['elapsed_s']:.1f}s wall)")
        return (
            f"done: {last['epoch']} epochs, test "
            + (f"accuracy {100 * acc:.2f}%" if acc is not None else f"loss {last['test_loss']:.5f}")
            + f"{median}, training loop {loop_s:.1f}s, whole run "
            f"{time.perf_counter() - self.t_start:.1f}s{reached}; metrics in {self.path(METRICS)}"
        )

    def _rewrite_metrics(self) -> None:
        if self.is_main:
            lines = "".join(json.dumps(m) + "\n" for m in self.history)
            with self._writing(METRICS):
                write_atomic(self.path(METRICS), lines)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with self._writing(name):
            fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())  # one write: one whole line
                os.fsync(fd)
            finally:
                os.close(fd)
