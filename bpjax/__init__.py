"""bpjax: backpropagation by hand in JAX, checked against ``jax.grad``.

The network is a description (``Net``: input shape, layers such as ``Dense``,
activation, loss) and pure functions over a params pytree (``init_params``,
``predict(net, params, x)``, ``loss_fn``); ``manual_grad(net, params, x, y)``
implements the documents' formulas, with the matrix of (7.2) from a feedback
``Rule`` (built-in by name, or your own: ``register_rule``);
``train(Config(...))`` runs the training loop that ``launch.py`` runs.
"""

from bpjax.activations import ACTIVATIONS
from bpjax.config import Config
from bpjax.data import Dataset, default_cache_dir, load_dataset, make_regression
from bpjax.errors import (
    BpjaxError,
    CheckpointError,
    ConfigError,
    DataError,
    RunError,
    TrainingError,
)
from bpjax.feedback import alignment, init_feedback
from bpjax.formulas import accumulated_grad, manual_grad, per_example_grads
from bpjax.layers import Dense
from bpjax.losses import LOSSES
from bpjax.methods import METHODS, grad_fn
from bpjax.network import Net, forward, init_params, layer_sizes, loss_fn, predict
from bpjax.noise_scale import (
    NoiseStats,
    gradient_noise_scale,
    noise_scale_estimates,
    noise_stats_grad_fn,
)
from bpjax.privacy import clipped_grad, per_example_grad_norms, private_grad, private_grad_fn
from bpjax.rules import FEEDBACK_RULES, Rule, get_rule, kp_feedback_grads, register_rule
from bpjax.rundir import read_metrics
from bpjax.runs import Run, load_run, runs_figure
from bpjax.training import TrainResult, evaluate, train

__all__ = [
    "ACTIVATIONS",
    "FEEDBACK_RULES",
    "LOSSES",
    "METHODS",
    "BpjaxError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "Dense",
    "Net",
    "NoiseStats",
    "Rule",
    "Run",
    "RunError",
    "TrainResult",
    "TrainingError",
    "accumulated_grad",
    "alignment",
    "clipped_grad",
    "default_cache_dir",
    "evaluate",
    "forward",
    "get_rule",
    "grad_fn",
    "gradient_noise_scale",
    "init_feedback",
    "init_params",
    "kp_feedback_grads",
    "layer_sizes",
    "load_dataset",
    "load_run",
    "loss_fn",
    "make_regression",
    "manual_grad",
    "noise_scale_estimates",
    "noise_stats_grad_fn",
    "per_example_grad_norms",
    "per_example_grads",
    "predict",
    "private_grad",
    "private_grad_fn",
    "read_metrics",
    "register_rule",
    "runs_figure",
    "train",
]
