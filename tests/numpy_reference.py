"""Shared by the training tests: a toy classification set and the MLP's metrics in NumPy.

No bpjax code computes the references here, so a test comparing a run's records with
them checks the run, not bpjax against itself.
"""

from __future__ import annotations

import numpy as np

from bpjax.data import Dataset


def toy_dataset(n_train: int, n_test: int = 40, d: int = 7, k: int = 3, seed: int = 0) -> Dataset:
    """``k`` Gaussian blobs in ``d`` dimensions, float64, integer labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 1.5
    y = rng.integers(0, k, n_train + n_test).astype(np.int32)
    x = centers[y] + rng.normal(size=(n_train + n_test, d))
    return Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], k)


def numpy_logits(params, x) -> np.ndarray:
    """The ReLU MLP's output Z^L in NumPy: no bpjax code involved."""
    a = np.asarray(x, np.float64)
    for l, p in enumerate(params):
        a = a @ np.asarray(p["W"]).T + np.asarray(p["b"])
        if l < len(params) - 1:
            a = np.maximum(a, 0)
    return a


def numpy_metrics(params, x, labels) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy of the ReLU MLP, in NumPy."""
    z = numpy_logits(params, x)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels]), np.mean(z.argmax(axis=1) == labels)
