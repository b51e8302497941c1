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
``feedback`` (the rule's own name), ``alignment_deg`` (per hidden layer: the angle
between the rule's dW^l and the true gradient), ``delta_deg`` (the mean per-example
angle between the rule's and backprop's error signals) and, for every rule but dfa,
``weight_deg`` (W^{l+1} vs the matrix (7.2) really uses), all measured on a fixed
batch (``bpjax.feedback.alignment``).

A resumed run is the same run: its ``config.json`` is never rewritten, and the
settings a resume may change (``Config`` fields marked resumable: epochs,
checkpoint cadence, devices, ...) are recorded as a ``resume`` event; any other
difference is refused before any work. ``metrics.jsonl`` is appended, one whole
line per epoch (a short ``write`` is completed) and fsynced, so ``tail -f``
follows a run; a reader skips a last line cut short by a crash, and the next
open cuts it off (kept in a ``repaired`` event). A resume continues from the
newest intact checkpoint the complete records reach (newer ones are kept, their
epochs recomputed: no hole) and rewrites ``metrics.jsonl`` once, atomically,
keeping the epochs its checkpoint covers. No record file is followed through a
symbolic link: a run directory never writes outside itself. A failed write (disk full, ...) stops
the run with one line; what was already on disk stays intact. With several
processes only process 0 writes files, takes the lock and logs; every process
takes part in checkpoint saves. The end of a run, however it ends (epochs done,
target, stop, an error between intervals), is checkpointed: the newest checkpoint
holds the state of the last record (a divergence saves nothing: it is the last
good one). A run ended part-way through epoch 2 is ``checkpoints/2`` with epoch
1.5 in its metadata; a resume continues from that step (``bpjax.checkpoint``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from bpjax.checkpoint import checkpoint_manager, refuse_unrecorded, restore_latest, save_checkpoint
from bpjax.config import Config, read_record
from bpjax.errors import BpjaxError, ConfigError, RunError, first_line
from bpjax.files import append_line, cut_torn_line, refuse_link, write_atomic
from bpjax.provenance import provenance
from bpjax.rules import check_recorded_rule, rule_record
from bpjax.runlock import LOCK, RunLock

Log = Callable[[str], None]
METRICS, EVENTS, CONFIG = "metrics.jsonl", "events.jsonl", "config.json"


def default_workdir(config: Config) -> str:
    """``runs/<date>-<time>-<dataset>-<method>-b<batch>``, relative to the working directory."""
    stamp, name = datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), config.dataset.split(":")[0]
    return os.path.join("runs", f"{stamp}-{name}-{config.method}-b{config.batch}")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a crash is skipped."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut short mid-write
                break
            raise RunError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}: line {i + 1} is not a JSON object")
        records.append(record)
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
    if record.get("val_accuracy") is not None:  # --validation_examples
        parts.append(f"val_acc {100 * record['val_accuracy']:.2f}%")
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
    if config.resume and recorded is None:
        refuse_unrecorded(workdir, CONFIG)
    differ = recorded.differences(config) if (config.resume and recorded) else {}
    if differ:
        listed = "; ".join(f"--{k}: recorded {a!r}, given {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"--resume continues the run in {workdir} with its recorded settings, but these"
            f" differ: {listed}. Drop those flags, or start a new run in another --workdir"
        )


def _check_rule_source(config: Config, workdir: str) -> str | None:
    """A rule named by import path must have the source the run recorded (``bpjax.rules``)."""
    record = read_record(os.path.join(workdir, CONFIG)).get("feedback_rule")
    events = os.path.join(workdir, EVENTS)
    accepted = [e.get("sha256") for e in (read_jsonl(events) if os.path.exists(events) else [])
                if e.get("event") == "feedback_rule_changed"]  # fmt: skip
    return check_recorded_rule(record, config.feedback, accept=config.accept_rule_change,
                               accepted=accepted)  # fmt: skip


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
        self.saved_epoch: int | float = 0  # the newest checkpoint's epoch (written or pending)
        self.last_recorded: tuple[int | float, Any] | None = None  # the last record's epoch, state
        self.resumed = False
        self._kept: set[int] = set()  # checkpoints newer than the records, kept on a resume
        self.intervals_per_epoch = 1  # evaluations per epoch (--eval_every_steps)
        self.t_start = time.perf_counter()
        self._elapsed_before = 0.0  # seconds the run had already taken before a resume
        self._train_s = 0.0  # training seconds so far, compilation and evaluation excluded
        if is_main:
            try:
                self._repair()  # before any append: a torn last line is cut off first
            except BaseException:
                self.close()
                raise

    @classmethod
    def open(cls, config: Config, *, log: Log, is_main: bool = True, device: Any = None) -> RunDir:
        """The run directory of ``config``; ``device`` (the run's first) goes into provenance."""
        workdir = config.workdir or default_workdir(config)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise RunError(f"--workdir={workdir} is a file, not a directory: choose a directory")
        _refuse_links(workdir)
        recorded = _recorded(workdir)
        _check_resume(config, workdir, recorded)
        changed_rule = _check_rule_source(config, workdir) if recorded and config.resume else None
        run = cls(config, workdir, log, is_main, recorded, device)
        if changed_rule:  # --accept_rule_change: the new source, recorded
            run.event("feedback_rule_changed", feedback=config.feedback, sha256=changed_rule)
        return run

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

    def resume(self, state: Any, meta: dict[str, Any]) -> tuple[Any, int | float]:
        """``(state, epoch)`` of the checkpoint to continue from, or ``(state, 0)`` to start.

        The newest intact checkpoint that the complete metrics records reach: a
        crash between a checkpoint and its record (or a torn record) must not
        leave a hole, so those epochs are recomputed, the newer checkpoints kept
        (``save`` skips them). Records the checkpoint does not cover are dropped.
        """
        restored, records = None, []
        if self.config.resume:
            records = read_metrics(self.workdir)
            reach = _reach(records, self.path(METRICS))
            restored = restore_latest(self.manager, state, meta, warn=self._warn_damaged,
                                      up_to=reach)  # fmt: skip
            self._kept = {s for s in self.manager.all_steps() if s > math.ceil(reach)}
            if self._kept:
                self._records_behind(reach, restored[1] if restored else 0)
            elif restored is None:
                self.log(f"no checkpoint in {self.workdir}: starting the run at epoch 1")
        if restored is None:
            self._rewrite_metrics()
            return state, 0
        state, epoch = restored
        self.resumed, self.saved_epoch = True, epoch
        self.history = [m for m in records if m["epoch"] <= epoch]
        self._elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        self._train_s = self.history[-1].get("train_s", 0.0) if self.history else 0.0
        self._rewrite_metrics()
        changed = self.recorded.differences(self.config, resumable=True) if self.recorded else {}
        changed = {k: list(v) for k, v in changed.items() if k != "resume"}
        self.event("resume", epoch=epoch, changed=changed, provenance=provenance(self.device))
        self.log(f"resumed {self.workdir} from the checkpoint of epoch {epoch}")
        return state, epoch

    def _records_behind(self, reach: int, epoch: int) -> None:
        kept = sorted(self._kept)
        self.event("records_behind", records_reach=reach, checkpoints=kept, continue_from=epoch)
        self.log(f"warning: {self.path(METRICS)} records epochs up to {reach} only, the"
                 f" checkpoints reach epoch {kept[-1]} (a crash cut the records short): continuing"
                 f" from {f'the checkpoint of epoch {epoch}' if epoch else 'the start'}, epochs"
                 f" {epoch + 1} to {kept[-1]} are recomputed (their checkpoints are kept)")

    def _repair(self) -> None:
        """Cuts a torn last line off both JSONL files, then records the cut bytes in an event."""
        cut = {}
        for name in (EVENTS, METRICS):
            with self._writing(name):
                cut[name] = cut_torn_line(self.path(name))
        for name, tail in cut.items():
            if tail is not None:
                self.event("repaired", file=name, cut=tail.decode(errors="replace"))
                self.log(f"warning: the last line of {self.path(name)} was cut short by a crash"
                         f" ({len(tail)} bytes): removed it; the lines before it are intact")

    def _warn_damaged(self, line: str) -> None:
        self.event("checkpoint_damaged", detail=line)
        self.log(line)

    def start(self, sizes: tuple[int, ...], data: dict[str, Any] | None = None) -> None:
        """Writes ``config.json`` for a new run: settings, sizes, workdir, provenance, data.

        A resumed run keeps its record; one resumed before its first checkpoint
        keeps its ``config.json`` too and starts again at epoch 1.
        """
        if not self.is_main or self.resumed:
            return
        if not self.recorded:
            record = {**self.config.to_dict(), "sizes": list(sizes), "workdir": self.workdir,
                      "provenance": provenance(self.device), "data": data}  # fmt: skip
            if rule := rule_record(self.config.feedback):  # a rule by import path, and its hash
                record["feedback_rule"] = rule
            with self._writing(CONFIG):
                write_atomic(self.path(CONFIG), json.dumps(record, indent=2) + "\n")
        self.event("start", epochs=self.config.epochs)

    def elapsed_s(self) -> float:
        return self._elapsed_before + time.perf_counter() - self.t_start

    def add_train_s(self, seconds: float) -> float:
        """Adds an interval's training time; returns the run's total so far."""
        self._train_s += seconds
        return self._train_s

    def save(self, epoch: int | float, state: Any, meta: dict[str, Any]) -> None:
        """Checkpoints ``state`` as epoch ``epoch``.

        Asynchronous: a failed write of the previous save surfaces here (or at
        ``close``) as a RunError naming that epoch.
        """
        self._wait_saved()  # the next save would wait for it anyway
        if epoch in self._kept:  # on disk from before a resume that recomputed it (``resume``)
            self.saved_epoch = epoch
            return
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
        self.last_recorded = (epoch, state)
        self.log(format_line(record, config.epochs, self._epoch_s() * (config.epochs - epoch)))

    def last_checkpoint(self) -> int | float | None:
        """The epoch of the newest checkpoint on disk (after pending saves finish)."""
        self._wait_saved()
        return self.saved_epoch if self.manager.latest_step() is not None else None

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
            append_line(self.path(name), json.dumps(record) + "\n")


def _refuse_links(workdir: str) -> None:
    """Refuses a record file (or ``checkpoints/``, ``damaged/``) that is a symbolic link.

    A run directory received from someone else must never make a run write
    outside it; files are also opened with ``O_NOFOLLOW`` (``bpjax.files``).
    """
    for name in (LOCK, CONFIG, METRICS, EVENTS, "checkpoints", "damaged"):
        refuse_link(os.path.join(workdir, name), "choose another --workdir")


def _reach(records: list[dict[str, Any]], path: str) -> int | float:
    """The epoch the metrics records reach (0: none; 1.5: part-way through epoch 2).

    A record without a numeric epoch, or out of order, is refused in one line:
    the records could not say which epochs they hold.
    """
    last = 0.0
    for i, record in enumerate(records):
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int | float) or epoch <= last:
            raise RunError(
                f"{path}: record {i + 1} has epoch {epoch!r} after epoch {last:g}; the records"
                " must count up from epoch 1: restore the file, or start a new --workdir"
            )
        last = epoch
    return int(last) if float(last).is_integer() else last
