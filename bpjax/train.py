"""The training loop: a jitted ``lax.scan`` epoch over device-resident data.

``train(config)`` is what ``launch.py`` and notebooks call. Per run it builds the
jitted epoch function once (compiled ahead of time, so compile time is measured
apart and later epochs never recompile), then per epoch: reshuffle from a key
derived from (seed, epoch), scan ``train_step`` over ``N // batch`` fixed-shape
batches, evaluate on the test set, log one line, checkpoint, append metrics.

Remainder: each epoch takes the first ``(N // batch) * batch`` samples of a
fresh permutation; the other ``N mod batch`` samples sit that epoch out. The
permutation changes every epoch, so no sample is systematically left out, and
every step has the same shape (one compilation).

Determinism: the initial parameters come from ``seed`` and epoch ``e`` shuffles
with ``fold_in(key, e)``, so a run resumed from the checkpoint of epoch ``e``
ends with exactly the parameters of an uninterrupted run.

Data parallelism (``config.num_devices != 1`` or several processes; see
``bpjax.parallel``): the same epoch program over a mesh ``("data",)``. The
dataset, parameters and optimizer state are replicated; each step's batch
indices and rows are split over ``data``, so every device gathers and processes
only its own M/D rows of every batch, and the gradient's sum over samples
(second document, section 6) becomes an all-reduce. Same seed, same shuffles,
same batches: D devices follow the one-device trajectory up to the summation
order of that all-reduce. With several processes, all run this function; only
process 0 logs and writes ``config.json``, ``metrics.jsonl`` and the checkpoint
bytes (all processes take part in a save; see ``bpjax.checkpoint``). With one device in one process
none of this is built: the program is the single-device one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from bpjax import parallel
from bpjax.checkpoint import checkpoint_manager, restore_latest, save_checkpoint
from bpjax.config import Config, ConfigError, check_batch_divides
from bpjax.data import Dataset, load_dataset
from bpjax.files import write_atomic
from bpjax.losses import get_loss
from bpjax.methods import grad_fn
from bpjax.network import Params, init_params, predict

Array = jax.Array


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a NaN loss); the message says where and why."""


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: optimizer steps taken so far


@dataclasses.dataclass(frozen=True)
class TrainResult:
    params: Params
    history: list[dict[str, Any]]
    workdir: str
    compiles: int  # traces of the epoch function in this process: 1 means no recompilation


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """``sgd`` is the documents' update W <- W - lr * dW."""
    if config.optimizer == "sgd":
        return optax.sgd(config.lr)
    if config.optimizer == "momentum":
        return optax.sgd(config.lr, momentum=config.momentum)
    return optax.adam(config.lr)


def make_grad(
    config: Config, mesh: Mesh | None = None
) -> Callable[[Params, Array, Array, Array], tuple[Params, Array]]:
    """``(params, x, y, key) -> (grads, outputs)`` for the configured method.

    ``key`` feeds the DP-SGD noise when ``dp_clip`` is set and is unused otherwise.
    With a ``mesh`` and ``config.parallel == "shard_map"``, the explicit
    per-device program of ``bpjax.parallel``; otherwise the single-device
    function (under a mesh, XLA partitions it from the batch's sharding).
    """
    if mesh is not None and config.parallel == "shard_map":
        sharded = parallel.sharded_grad_fn(
            config.method, mesh, activation=config.activation, loss=config.loss
        )
        return lambda params, x, y, key: sharded(params, x, y)
    if config.dp_clip is not None:
        from bpjax.privacy import private_grad_fn

        return private_grad_fn(
            config.method,
            clip=config.dp_clip,
            noise_multiplier=config.dp_noise,
            activation=config.activation,
            loss=config.loss,
        )
    grad = grad_fn(config.method, activation=config.activation, loss=config.loss)
    return lambda params, x, y, key: grad(params, x, y)


def batch_metrics(outputs: Array, y: Array, loss: str) -> dict[str, Array]:
    """Summed loss and correct count of one batch (sums, so epochs average exactly)."""
    metrics = {"loss_sum": jnp.sum(get_loss(loss).per_sample(outputs, y))}
    if loss == "softmax_cross_entropy":
        hits = jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)
        metrics["correct"] = jnp.sum(hits.astype(jnp.int32))
    return metrics


def train_step(
    state: TrainState, x: Array, y: Array, key: Array, *, grad, optimizer, loss: str
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on the batch ``x: (B, n_0)``, ``y: (B, n_L)``."""
    grads, outputs = grad(state.params, x, y, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), batch_metrics(outputs, y, loss)


def run_epoch(
    state: TrainState,
    x: Array,
    y: Array,
    key: Array,
    *,
    step_fn,
    batch: int,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """Shuffles ``x: (N, n_0)``, ``y: (N, n_L)`` and scans ``step_fn`` over full batches.

    With a ``mesh``, each batch's indices and rows are split over its ``data``
    axis: device d gathers rows ``[d B/D, (d+1) B/D)`` of every batch.
    Returns per-step metrics with a leading ``(N // batch,)`` axis.
    """
    steps = x.shape[0] // batch
    shuffle_key, noise_key = jax.random.split(key)
    order = jax.random.permutation(shuffle_key, x.shape[0])[: steps * batch]

    def body(state, i):
        idx = lax.dynamic_slice_in_dim(order, i * batch, batch)
        if mesh is None:
            return step_fn(state, x[idx], y[idx], jax.random.fold_in(noise_key, i))
        idx = parallel.shard_rows(idx, mesh)
        x_B, y_B = parallel.shard_rows(x[idx], mesh), parallel.shard_rows(y[idx], mesh)
        return step_fn(state, x_B, y_B, jax.random.fold_in(noise_key, i))

    return lax.scan(body, state, jnp.arange(steps))


def evaluate(params: Params, x: Array, y: Array, *, activation: str, loss: str) -> dict[str, Array]:
    """Mean loss and accuracy (classification only) over ``x: (N, n_0)``."""
    m = batch_metrics(predict(params, x, activation=activation), y, loss)
    out = {"loss": m["loss_sum"] / x.shape[0]}
    if "correct" in m:
        out["accuracy"] = m["correct"] / x.shape[0]
    return out


def prepare_data(
    dataset: Dataset, config: Config, device: jax.Device | Mesh
) -> dict[str, Array]:
    """Targets as rows (one-hot for classification), cast, and placed on ``device``.

    Given a mesh, every device of it gets a copy (in every process).
    """
    dtype = jnp.dtype(config.dtype)
    n = config.train_examples or dataset.x_train.shape[0]
    if n > dataset.x_train.shape[0]:
        raise ConfigError(
            f"--train_examples={n} exceeds the {dataset.x_train.shape[0]} training examples of "
            f"{dataset.name}"
        )
    if config.batch > n:
        raise ConfigError(
            f"--batch={config.batch} is larger than the training set ({n} examples of "
            f"{dataset.name}): lower --batch"
        )

    def targets(y: np.ndarray) -> np.ndarray:
        if dataset.num_classes is None:
            return y.astype(dtype)
        return np.eye(dataset.num_classes, dtype=dtype)[y]

    arrays = {
        "x_train": dataset.x_train[:n].astype(dtype),
        "y_train": targets(dataset.y_train[:n]),
        "x_test": dataset.x_test.astype(dtype),
        "y_test": targets(dataset.y_test),
    }
    if isinstance(device, Mesh):
        return parallel.replicate(arrays, device)
    return jax.device_put(arrays, device)


def data_mesh(config: Config) -> Mesh | None:
    """The data-parallel mesh of ``config``; None for one device in one process.

    Raises a one-line ConfigError when the devices are too few, the batch does
    not divide over them, or the processes are not those the config names.
    """
    parallel.check_processes(config.num_processes)
    if config.num_devices == 1 and config.num_processes == 1:
        return None
    devices = parallel.select_devices(config.platform, config.num_devices, config.num_processes)
    if not config.num_devices:  # --num_devices=0 (all): the count is known only now
        check_batch_divides(
            config.batch, len(devices), over=f"the {len(devices)} devices of --num_devices=0 (all)"
        )
    if len(devices) == 1:  # --num_devices=0 on a one-device host
        return None
    return parallel.make_data_mesh(devices)


def default_workdir(config: Config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{config.dataset}-{config.method}-b{config.batch}")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run, one dict per line of ``metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _format_line(m: dict[str, Any], epochs: int) -> str:
    acc = m.get("test_accuracy")
    train_acc = m.get("train_accuracy")
    parts = [
        f"epoch {m['epoch']:>3}/{epochs}",
        f"step {m['step']}",
        f"loss {m['train_loss']:.4f}",
    ]
    if train_acc is not None:
        parts.append(f"train_acc {100 * train_acc:.2f}%")
    parts.append(f"test_loss {m['test_loss']:.4f}")
    if acc is not None:
        parts.append(f"test_acc {100 * acc:.2f}%")
    parts += [
        f"{m['samples_per_sec'] / 1e3:.1f}k samples/s",
        f"epoch {m['epoch_time']:.2f}s",
        f"elapsed {m['wall_time']:.1f}s",
        f"ETA {m['eta']:.1f}s",
    ]
    return "  ".join(parts)


def train(
    config: Config,
    *,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Trains the network ``config`` describes; writes config, metrics, checkpoints.

    Args:
      config: the run.
      dataset: already loaded data (notebooks, tests); else ``load_dataset``.
      log: receives one readable line per event (``print`` by default).

    Returns:
      The final params, the per-epoch metrics and the workdir.
    """
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with x64:
        return _train(config, dataset, log)


def _train(config: Config, dataset: Dataset | None, log: Callable[[str], None]) -> TrainResult:
    t_start = time.perf_counter()
    mesh = data_mesh(config)
    if mesh is None:
        device = parallel.select_devices(config.platform, 1)[0]
    else:
        device = mesh.devices.flat[0]
    is_main = jax.process_index() == 0  # only process 0 logs and writes files
    if not is_main:
        log = lambda line: None  # noqa: E731
    workdir = config.workdir or default_workdir(config)
    manager_exists = os.path.isdir(os.path.join(workdir, "checkpoints"))
    if manager_exists and not config.resume and os.listdir(os.path.join(workdir, "checkpoints")):
        raise ConfigError(
            f"--workdir={workdir} already holds checkpoints: pass --resume to continue that run,"
            " or choose a new --workdir"
        )
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    data = prepare_data(dataset, config, device if mesh is None else mesh)
    n_train, n_in = data["x_train"].shape
    sizes = (n_in, *config.hidden, data["y_train"].shape[1])
    os.makedirs(workdir, exist_ok=True)

    dtype = jnp.dtype(config.dtype)
    key = jax.random.key(config.seed)
    init_key, data_key = jax.random.split(key)
    optimizer = make_optimizer(config)
    if mesh is None:
        params = jax.device_put(init_params(init_key, sizes, dtype), device)
        state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    else:
        params = init_params(init_key, sizes, dtype)
        state = TrainState(params, optimizer.init(params), np.zeros((), np.int32))
        state = parallel.replicate(state, mesh)
    meta = {
        "sizes": list(sizes),
        "dtype": config.dtype,
        "optimizer": config.optimizer,
        "activation": config.activation,
        "loss": config.loss,
    }

    manager = checkpoint_manager(workdir, keep=config.keep_checkpoints)
    start_epoch, history = 0, []
    if config.resume:
        restored = restore_latest(manager, state, meta)
        if restored is not None:
            state, start_epoch = restored
            if mesh is None:  # else Orbax restored into the target's (replicated) sharding
                state = jax.device_put(state, device)
            history = [m for m in read_metrics(workdir) if m["epoch"] <= start_epoch]
            log(f"resumed {workdir} from the checkpoint of epoch {start_epoch}")
    if is_main:
        write_atomic(
            os.path.join(workdir, "config.json"),
            json.dumps({**config.to_dict(), "sizes": list(sizes), "workdir": workdir}, indent=2),
        )

    traces = [0]

    def counted_epoch(state, x, y, key):
        traces[0] += 1  # runs at trace time only: counts compilations
        step_fn = functools.partial(
            train_step, grad=make_grad(config, mesh), optimizer=optimizer, loss=config.loss
        )
        return run_epoch(state, x, y, key, step_fn=step_fn, batch=config.batch, mesh=mesh)

    epoch_fn = jax.jit(counted_epoch, donate_argnums=0)
    eval_fn = jax.jit(functools.partial(evaluate, activation=config.activation, loss=config.loss))
    steps_per_epoch = n_train // config.batch
    where = f"{device.device_kind} ({device.platform})"
    if mesh is not None:
        where = f"{mesh.size} x {where}, data parallel by {config.parallel}" + (
            f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
        )
    log(
        f"{dataset.name}: {n_train} train / {data['x_test'].shape[0]} test examples, network "
        f"{'-'.join(map(str, sizes))} ({config.activation}, {config.loss}), method "
        f"{config.method}, {config.optimizer} lr {config.lr}, batch {config.batch} "
        f"({steps_per_epoch} steps/epoch, {n_train % config.batch} left out per epoch), "
        f"{config.dtype} on {where}, workdir {workdir}"
    )

    t0 = time.perf_counter()
    epoch_key0 = jax.random.fold_in(data_key, 0)
    compiled = epoch_fn.lower(state, data["x_train"], data["y_train"], epoch_key0).compile()
    log(f"compiled the epoch in {time.perf_counter() - t0:.2f}s")

    wall_offset = history[-1]["wall_time"] if history else 0.0
    t_loop = time.perf_counter()
    epoch_times: list[float] = []
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t_epoch = time.perf_counter()
        epoch_key = jax.random.fold_in(data_key, epoch)
        new_state, steps = compiled(state, data["x_train"], data["y_train"], epoch_key)
        steps = jax.device_get(steps)
        epoch_time = time.perf_counter() - t_epoch
        step_losses = steps["loss_sum"] / config.batch
        if not np.all(np.isfinite(step_losses)):
            bad = int(np.argmax(~np.isfinite(step_losses)))
            manager.wait_until_finished()
            last = manager.latest_step()
            raise TrainingError(
                f"the loss became {step_losses[bad]} at epoch {epoch}, step "
                f"{int(new_state.step) - steps_per_epoch + bad + 1} (step {bad + 1} of the epoch);"
                " stopped. The last good checkpoint is "
                + (f"epoch {last} in {manager.directory}" if last else "none (no epoch finished)")
                + ". Lower --lr or check the data"
            )
        state = new_state
        test = jax.device_get(eval_fn(state.params, data["x_test"], data["y_test"]))
        epoch_times.append(epoch_time)
        wall = wall_offset + time.perf_counter() - t_start
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(np.sum(steps["loss_sum"]) / (steps_per_epoch * config.batch)),
            "train_accuracy": (
                float(np.sum(steps["correct"]) / (steps_per_epoch * config.batch))
                if "correct" in steps
                else None
            ),
            "test_loss": float(test["loss"]),
            "test_accuracy": float(test["accuracy"]) if "accuracy" in test else None,
            "samples_per_sec": steps_per_epoch * config.batch / epoch_time,
            "epoch_time": epoch_time,
            "wall_time": wall,
            "eta": float(np.median(epoch_times)) * (config.epochs - epoch),
        }
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            save_checkpoint(manager, epoch, state, meta)
        history.append(record)
        if is_main:
            write_atomic(
                os.path.join(workdir, "metrics.jsonl"),
                "".join(json.dumps(m) + "\n" for m in history),
            )
        log(_format_line(record, config.epochs))
    manager.wait_until_finished()
    manager.close()

    if history:
        last = history[-1]
        acc = last.get("test_accuracy")
        loop = time.perf_counter() - t_loop
        log(
            f"done: {len(history)} epochs, test "
            + (f"accuracy {100 * acc:.2f}%" if acc is not None else f"loss {last['test_loss']:.5f}")
            + f", median epoch {np.median(epoch_times) if epoch_times else math.nan:.3f}s, "
            f"training loop {loop:.1f}s, whole run {time.perf_counter() - t_start:.1f}s; "
            f"metrics in {os.path.join(workdir, 'metrics.jsonl')}"
        )
    return TrainResult(jax.device_get(state.params), history, workdir, traces[0])
