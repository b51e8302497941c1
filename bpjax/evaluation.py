"""What a run measures and checks between its training steps.

After every interval of training (an epoch, or ``--eval_every_steps`` steps)
the loop evaluates the parameters (:class:`Evaluator`: test loss and accuracy,
whether every parameter is finite, and for a feedback rule other than bp the
alignment angles on a fixed batch), stops a run that broke before its state
can be saved (:func:`check_health`), builds the metrics record
(:func:`interval_record`) and asks whether a target was reached
(:func:`target_reached`). ``batch_metrics`` is what every training step
reports: sums, so that averages over steps are exact.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import rules
from bpjax.errors import TrainingError
from bpjax.feedback import alignment
from bpjax.losses import get_loss
from bpjax.network import Net, Params, predict
from bpjax.noise_scale import NoiseStats, noise_scale_estimates

if TYPE_CHECKING:
    from bpjax.config import Config
    from bpjax.rundir import RunDir

Array = jax.Array
ALIGNMENT_BATCH = 512  # the first examples of the training set: the fixed alignment batch


def batch_metrics(outputs: Array, y: Array, loss: str, classify: bool = True) -> dict[str, Array]:
    """Summed loss and correct count of one batch (sums, so epochs average exactly).

    ``classify``: the targets are one-hot classes, whatever the loss (MNIST
    under squared error has an accuracy too); regression targets have none.
    """
    metrics = {"loss_sum": jnp.sum(get_loss(loss).per_sample(outputs, y))}
    if classify:
        hits = jnp.argmax(outputs, axis=-1) == jnp.argmax(y, axis=-1)
        metrics["correct"] = jnp.sum(hits.astype(jnp.int32))
    return metrics


def evaluate(
    net: Net, params: Params, x: Array, y: Array, *, classify: bool = True
) -> dict[str, Array]:
    """Mean loss and accuracy (classification only) over ``x: (N, n_0)``."""
    m = batch_metrics(predict(net, params, x), y, net.loss, classify)
    out = {"loss": m["loss_sum"] / x.shape[0]}
    if "correct" in m:
        out["accuracy"] = m["correct"] / x.shape[0]
    return out


def all_finite(params: Params) -> Array:
    """One boolean: every parameter is finite (checked before a checkpoint is written)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


class Evaluator:
    """Test metrics, finiteness and (rules other than bp) alignment of a training state.

    The test forward pass runs in the compute dtype, like the training steps
    (its loss and softmax in float32: the losses upcast); finiteness is checked
    on the master parameters.

    ``data`` holds ``x_test, y_test`` (placed) and ``x_train, y_train`` whose
    first ``ALIGNMENT_BATCH`` rows are the fixed alignment batch.
    """

    def __init__(self, config: Config, data: Any, classify: bool) -> None:
        net = config.net(data.x_test.shape[1], data.y_test.shape[1])
        compute = jnp.dtype(config.dtype)  # bfloat16: the forward pass of the training steps

        def test(params: Params, x: Array, y: Array) -> dict[str, Array]:
            run_params = jax.tree.map(lambda p: p.astype(compute), params)
            return {**evaluate(net, run_params, x, y, classify=classify),
                    "finite": all_finite(params)}  # fmt: skip

        self.test = jax.jit(test)
        self.rule, self.data = config.rule, data
        # A rule that draws its matrix (brsf) is measured with one fixed draw from the seed.
        self.key = rules.step_key(self.rule, jax.random.key(config.seed))
        self.align = jax.jit(functools.partial(alignment, net, rule=self.rule))
        self.fixed = (data.x_train[:ALIGNMENT_BATCH], data.y_train[:ALIGNMENT_BATCH])

    def __call__(self, state: Any) -> dict[str, Any]:
        out = jax.device_get(self.test(state.params, self.data.x_test, self.data.y_test))
        if getattr(self.data, "x_val", None) is not None:  # --validation_examples
            out["val"] = jax.device_get(self.test(state.params, self.data.x_val, self.data.y_val))
        if self.rule != rules.bp:  # bp's angles are 0 by definition
            angles = jax.device_get(
                self.align(state.params, state.feedback, *self.fixed, key=self.key)
            )
            out["alignment"] = {k: [float(a) for a in v] for k, v in angles.items()}
            out["rule"] = self.rule.name
        return out


def check_health(config: Config, epoch: float, state: Any, steps: dict[str, np.ndarray],
                 test: dict[str, Any], start_loss: float, run: RunDir) -> None:  # fmt: skip
    """Stops a run that broke in the last interval before its state is saved or called good.

    Raises TrainingError when a step's loss is not finite; when the parameters
    (or the test loss) are not, which a blow-up in the interval's last update
    leaves behind with every step's loss finite; or when the interval's train
    or test loss exceeds ``config.divergence_factor`` times ``start_loss``,
    the test loss of the initial parameters (a run that diverges without ever
    reaching inf: lr far too large).
    """
    losses = steps["loss_sum"] / config.batch
    train_loss, test_loss = float(np.mean(losses)), float(test["loss"])
    factor = config.divergence_factor
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        what = (f"the loss became {losses[bad]} at epoch {epoch:g}, step "
                f"{int(state.step) - len(losses) + bad + 1}")  # fmt: skip
    elif not (test["finite"] and np.isfinite(test_loss)):
        what = (f"the parameters stopped being finite by epoch {epoch:g}, step"
                f" {int(state.step)} (test loss {test_loss})")  # fmt: skip
    elif factor and max(train_loss, test_loss) > factor * start_loss:
        which, value = ("train", train_loss) if train_loss > test_loss else ("test", test_loss)
        what = (f"the {which} loss grew to {value:.4g} at epoch {epoch:g}, more than {factor:g}x"
                f" the loss at the start ({start_loss:.4g}; --divergence_factor={factor:g})")
    else:
        return
    last = run.last_checkpoint()
    run.event("stopped", epoch=epoch, reason=what)
    raise TrainingError(
        f"{what}; stopped. The last good checkpoint is "
        + (f"epoch {last} in {run.manager.directory}" if last else "none (no epoch finished)")
        + f". Lower --lr (now {config.peak_lr:g}) or check the data"
    )


def interval_record(epoch: float, state: Any, steps: dict[str, np.ndarray], batch: int,
                    test: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """The metrics record of one evaluation (see ``bpjax.rundir`` for each key).

    ``steps`` holds each step's summed loss and correct count over its ``batch``
    samples: the train metrics average over the samples the interval saw.
    ``seconds``: ``epoch_s`` (this interval's training), ``train_s`` (all
    training so far, compilation and evaluation excluded), ``elapsed_s``.
    """
    seen = steps["loss_sum"].shape[0] * batch
    angles = test.get("alignment", {})
    record = {
        "epoch": int(epoch) if float(epoch).is_integer() else round(float(epoch), 6),
        "step": int(state.step),
        "train_loss": float(np.sum(steps["loss_sum"]) / seen),
        "train_accuracy": float(np.sum(steps["correct"]) / seen) if "correct" in steps else None,
        "test_loss": float(test["loss"]),
        "test_accuracy": float(test["accuracy"]) if "accuracy" in test else None,
        **_val_metrics(test.get("val")),
        "samples_per_s": seen / seconds["epoch_s"],
        **seconds,
    }
    if angles:  # the rule by its own name, beside its angles
        record |= {"feedback": test["rule"], "alignment_deg": angles["alignment_deg"],
                   "delta_deg": angles["delta_deg_mean"]}  # fmt: skip
    if "weight_deg" in angles:
        record["weight_deg"] = angles["weight_deg"]
    if "mean_sq_norm" in steps:  # --noise_scale: the interval's averages, then (G), (T), (B)
        stats = NoiseStats(np.mean(steps["mean_sq_norm"]), np.mean(steps["batch_sq_norm"]))
        estimates = noise_scale_estimates(stats, batch)
        record |= {k: float(estimates[k]) for k in ("b_simple", "grad_sq_norm", "trace_sigma")}
    return record


def _val_metrics(val: dict[str, Any] | None) -> dict[str, Any]:
    """``val_loss`` and ``val_accuracy`` (None without classes); nothing without a hold-out."""
    if val is None:
        return {}
    accuracy = float(val["accuracy"]) if "accuracy" in val else None
    return {"val_loss": float(val["loss"]), "val_accuracy": accuracy}


def target_reached(config: Config, record: dict[str, Any]) -> bool:
    """The record meets ``--target_accuracy`` or ``--target_loss`` (never without one)."""
    return meets_target(record, config.target_accuracy, config.target_loss, config.target_split)


def meets_target(record: Mapping[str, Any], accuracy: float | None, loss: float | None,
                 split: str = "test") -> bool:  # fmt: skip
    """The metrics record's accuracy on ``split`` reaches ``accuracy`` or its loss ``loss``.

    ``split``: ``"test"`` or ``"validation"`` (``val_*``, ``--target_split``). A target
    that is None never counts; a record without that accuracy (or loss) misses any.
    """
    key = "val" if split == "validation" else "test"
    acc_ok = accuracy is not None and (record.get(f"{key}_accuracy") or 0.0) >= accuracy
    lost = record.get(f"{key}_loss")
    return acc_ok or (loss is not None and lost is not None and lost <= loss)
