"""bpjax: backpropagation by hand in JAX, checked against ``jax.grad``."""

from bpjax.activations import ACTIVATIONS
from bpjax.formulas import accumulated_grad, manual_grad, per_example_grads
from bpjax.losses import LOSSES
from bpjax.network import forward, init_params, layer_sizes, loss_fn, predict

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "accumulated_grad",
    "forward",
    "init_params",
    "layer_sizes",
    "loss_fn",
    "manual_grad",
    "per_example_grads",
    "predict",
]
