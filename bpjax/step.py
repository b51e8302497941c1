"""One training step and the epoch's scan: the update the training loop repeats.

``train_step(state, x, y, key, *, grad, optimizer, loss)`` is the documents'
update (gradient by the configured method and feedback rule, then the optax
rule: ``sgd`` is W <- W - lr * dW), returning the batch's loss sum and correct
count; ``run_steps`` scans it over a shuffled epoch (or a chunk of one) inside
one ``jax.jit``. ``make_grad`` is the switchboard of gradient routes and
``make_optimizer`` the update rule with its learning-rate schedule. The
benchmarks time exactly this step (``bpjax.bench.steps``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from bpjax import parallel
from bpjax.config import Config
from bpjax.evaluation import batch_metrics
from bpjax.feedback import Feedback
from bpjax.methods import grad_fn, in_compute_dtype
from bpjax.network import Net, Params
from bpjax.noise_scale import noise_stats_grad_fn
from bpjax.privacy import private_grad_fn
from bpjax.rules import step_key

if TYPE_CHECKING:
    from bpjax.parallel import Placement

Array = jax.Array

# XLA:CPU's YNNPACK can fuse a matrix product with the elementwise work around it (the
# update W - lr dW, the bias and the ReLU) into one kernel. Measured on the development
# CPU (2-core Zen 5, jax 0.10.2; a training epoch of 784-500-10 at each batch, interleaved
# with the default): 5-11% faster epochs at batches 32-256, 4-11% slower at 512 and 1024,
# so the training step asks for it only up to this many rows per device.
_FUSE_ELEMENTWISE_UP_TO = 256
_LIBRARY = "LIBRARY_FUSION_TYPE_"


def compiler_options(platform: str, rows_per_device: int) -> dict[str, str] | None:
    """XLA options for compiling the training step (``jax.jit(compiler_options=...)``).

    None but on a CPU at small batches (see ``_FUSE_ELEMENTWISE_UP_TO``): there, the
    YNNPACK library fusions take dots with their elementwise neighbours (the default
    takes each dot alone) and reductions. The option is experimental: an XLA that does
    not know it gets None, so every caller compiles as it would without it.
    """
    if platform != "cpu" or rows_per_device > _FUSE_ELEMENTWISE_UP_TO:
        return None
    options = (("xla_cpu_experimental_ynn_fusion_type", f"{_LIBRARY}DOT,{_LIBRARY}REDUCE"),)
    return dict(options) if _cpu_accepts(options) else None


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this process's XLA:CPU compiles with ``options`` (one tiny compile, once)."""
    one = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(options)).lower(one).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: optimizer steps taken so far
    feedback: Feedback = ()  # the rule's state (bpjax.feedback): B matrices; learned under kp



def make_optimizer(config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The update rule with its learning-rate schedule (``sgd``: W <- W - lr * dW).

    The schedule's peak is ``config.peak_lr`` (``--lr`` scaled to the batch);
    ``steps_per_epoch`` converts ``--warmup_epochs`` and ``--epochs`` to steps
    (a constant rate does not need it).
    """
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.sgd(lr)
    if config.optimizer == "momentum":
        return optax.sgd(lr, momentum=config.momentum)
    return optax.adam(lr)


def learning_rate(config: Config, steps_per_epoch: int = 1) -> float | optax.Schedule:
    """``config.peak_lr``, or an optax schedule of it over the run's steps."""
    peak, total = config.peak_lr, max(config.epochs * steps_per_epoch, 1)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "constant":
        return peak
    if config.lr_schedule == "warmup_constant":
        return optax.warmup_constant_schedule(0.0, peak, warmup)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(peak, total)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total)


GradFn = Callable[[Params, Array, Array, Array, Feedback], tuple[Params, Array]]


def make_grad(config: Config, mesh: Mesh | None = None, *, net: Net | None = None) -> GradFn:
    """``(params, x, y, key, feedback) -> (grads, outputs)`` for the configured method.

    The switchboard of gradient routes: the lowest module that sees all three
    tables (``methods.grad_fn``, ``privacy.private_grad_fn``,
    ``parallel.sharded_grad_fn``; with ``noise_scale``, ``noise_stats_grad_fn``,
    whose third output the step logs). ``grads`` is the rule's update
    (``config.rule``; the gradient under ``bp``). ``key`` feeds the DP-SGD
    noise when ``dp_clip`` is set, and a rule that draws its matrix (brsf) through
    its own stream (``rules.step_key``); a rule that draws nothing never sees it.
    ``net``: the network (default ``config.net()``, the dataset's shapes). With a ``mesh`` and
    ``config.parallel == "shard_map"``, the explicit per-device program;
    otherwise the single-device function (under a mesh, XLA partitions it from
    the batch's sharding).
    """
    net, rule = net or config.net(), config.rule
    compute = config.dtype  # bfloat16: mixed precision (methods.py); else no cast at all
    if config.noise_scale:  # (grads, outputs, NoiseStats): the statistics of the same pass
        fn = in_compute_dtype(noise_stats_grad_fn(net, config.method, rule=rule), compute)
    elif mesh is not None and config.parallel == "shard_map":
        fn = in_compute_dtype(parallel.sharded_grad_fn(net, config.method, mesh, rule=rule),
                              compute)  # fmt: skip
    elif config.dp_clip is not None:  # the noise's key, and the rule's from it (privacy.py)
        return private_grad_fn(
            net, config.method, clip=config.dp_clip, noise_multiplier=config.dp_noise,
            rule=rule, compute_dtype=compute,
        )  # fmt: skip
    else:
        fn = grad_fn(net, config.method, rule=rule, compute_dtype=compute)
    return lambda params, x, y, key, feedback: fn(params, x, y, feedback, step_key(rule, key))


def train_step(
    state: TrainState, x: Array, y: Array, key: Array, *, grad: GradFn, optimizer, loss: str,
    classify: bool = True, learn: Callable | None = None, kp_decay: float | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on the batch ``x: (B, n_0)``, ``y: (B, n_L)``.

    With ``learn`` (a rule's, e.g. Kolen-Pollack's ``rules.kp_feedback_grads``), the
    feedback learns with the weights: B^l receives W^l's update dW^l, both decay by
    λ = ``kp_decay``, one optimizer over the pair.
    """
    grads, outputs, *stats = grad(state.params, x, y, key, state.feedback)
    metrics = batch_metrics(outputs, y, loss, classify)
    if stats:  # --noise_scale: this batch's S and |G_M|^2 (bpjax.noise_scale)
        metrics |= stats[0]._asdict()
    if learn is None:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params, feedback = optax.apply_updates(state.params, updates), state.feedback
    else:
        pair = (state.params, state.feedback)
        pair_grads = learn(grads, state.params, state.feedback, kp_decay)
        updates, opt_state = optimizer.update(pair_grads, state.opt_state, pair)
        params, feedback = optax.apply_updates(pair, updates)
    return TrainState(params, opt_state, state.step + 1, feedback), metrics


def make_train_step(
    config: Config, mesh: Mesh | None = None, *, net: Net | None = None,
    steps_per_epoch: int = 1, classify: bool = True,
) -> Callable[[TrainState, Array, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """``train_step`` as a run of ``config`` takes it: ``(state, x, y, key) -> (state, metrics)``.

    The configured gradient (``make_grad``), update rule and schedule
    (``make_optimizer``; ``steps_per_epoch`` converts epochs to steps), and for a rule
    whose feedback learns (kp) its ``learn`` with decay ``config.kp_decay``. ``net``:
    the network (default ``config.net()``).
    """
    learn = config.rule.learn
    return functools.partial(
        train_step, grad=make_grad(config, mesh, net=net), loss=config.loss,
        optimizer=make_optimizer(config, steps_per_epoch), classify=classify,
        learn=learn, kp_decay=config.kp_decay if learn is not None else None,
    )  # fmt: skip


def initial_opt_state(config: Config, params: Params, feedback: Feedback = ()) -> optax.OptState:
    """The update rule's state at step 0: of ``params``, or under kp of ``(params, feedback)``."""
    learned = (params, feedback) if config.rule.learn is not None else params
    return make_optimizer(config).init(learned)


def run_steps(
    state: TrainState,
    x: Array,
    y: Array,
    key: Array,
    first: Array | int = 0,
    *,
    step_fn,
    batch: int,
    steps: int | None = None,
    place: Placement | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """Steps ``first .. first + steps - 1`` of the epoch that ``key`` shuffles.

    The epoch shuffles ``x: (N, n_0)``, ``y: (N, n_L)`` with the first half of
    ``split(key)`` and takes ``N // batch`` full batches; step i draws its noise
    key as ``fold_in(second half, i)``. ``steps`` defaults to the whole epoch.
    (Gathering each step's rows during the step before, carried in the scan,
    was measured: XLA copies the carried batch in and out, and the epoch got no
    faster on a quiet CPU.)
    With a mesh in ``place``, each batch's indices and rows are split over its
    ``data`` axis: device d gathers rows ``[d B/D, (d+1) B/D)`` of every batch.
    Returns per-step metrics with a leading ``(steps,)`` axis.
    """
    shard = place.shard_rows if place is not None else (lambda a: a)
    whole = place.everywhere if place is not None else (lambda a: a)
    per_epoch = x.shape[0] // batch
    shuffle_key, noise_key = jax.random.split(key)
    order = whole(jax.random.permutation(shuffle_key, x.shape[0])[: per_epoch * batch])

    def body(state, i):
        idx = shard(lax.dynamic_slice_in_dim(order, i * batch, batch))
        return step_fn(state, shard(x[idx]), shard(y[idx]), jax.random.fold_in(noise_key, i))

    return lax.scan(body, state, first + jnp.arange(steps or per_epoch))


def run_epoch(state: TrainState, x: Array, y: Array, key: Array, *, step_fn, batch: int,
              place: Placement | None = None) -> tuple[TrainState, dict[str, Array]]:  # fmt: skip
    """A whole epoch: :func:`run_steps` from step 0."""
    return run_steps(state, x, y, key, step_fn=step_fn, batch=batch, place=place)
