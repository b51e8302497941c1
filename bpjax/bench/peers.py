"""The outside peers a JAX step is timed against, on the host.

* ``numpy``: the first document's NumPy code (section 3), for any depth: column
  layout (one sample per column), ``e2 = probs - labels``, ``dw2 = e2 h1^T / n``,
  ... Timed beside the JAX methods, so it must compute the same gradient (the
  tests check it against ``bpjax.manual_grad`` in float64).
* ``torch``: PyTorch autograd and an in-place SGD update, when PyTorch is
  importable (it is imported only when asked for).

Both support the documents' network only: ReLU hidden layers, softmax
cross-entropy. Each ``make_*_step`` returns a ``() -> None`` closure over its
own copy of the parameters and data, updated in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

PEERS = ("numpy", "torch")
HostParams = Sequence[Mapping[str, np.ndarray]]  # [{"W": (n_out, n_in), "b": (n_out,)}, ...]


def numpy_grads(
    params: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray, labels: np.ndarray
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The first document's NumPy backward (section 3), for any depth.

    Column layout as in the document: ``x: (n_0, n)``, ``labels: (n_L, n)``
    one-hot, ``params[l] = (W: (n_out, n_in), b: (n_out, 1))``; ReLU hidden
    layers, softmax output. Returns ``([(dw, db) per layer], probs)``.
    """
    hs = [x]                                                 # h0 = x
    for W, b in params[:-1]:
        hs.append(np.maximum(W @ hs[-1] + b, 0.0))           # h1 = relu(w1 x + b1)
    W, b = params[-1]
    logits = W @ hs[-1] + b                                  # h2 = w2 h1 + b2
    logits = logits - logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)                # probs = softmax(h2)
    n = probs.shape[1]
    e = probs - labels                                       # e2 = probs - labels
    grads: list[tuple[np.ndarray, np.ndarray]] = []
    for l in reversed(range(len(params))):
        dw = np.dot(e, hs[l].T) / n                          # dw2 = e2 h1^T / n
        db = np.mean(e, axis=1)[:, np.newaxis]               # db2 = mean(e2, axis=1)
        grads.append((dw, db))
        if l > 0:
            e = np.dot(params[l][0].T, e)                    # e1 = w2^T e2
            e[hs[l] <= 0.0] = 0.0                            # e1[h1 <= 0] = 0
    return grads[::-1], probs


def make_numpy_step(
    params: HostParams, x_rows: np.ndarray, y_rows: np.ndarray, lr: float
) -> Callable[[], None]:
    """The NumPy baseline step, in place: ``() -> None``; ``step.params`` holds (W, b).

    Data are put in the document's column layout once, outside the timed step.
    """
    cols = [(np.array(p["W"]), np.array(p["b"])[:, None]) for p in params]
    x, labels = np.ascontiguousarray(x_rows.T), np.ascontiguousarray(y_rows.T)

    def step():
        grads, _ = numpy_grads(cols, x, labels)
        for (W, b), (dw, db) in zip(cols, grads, strict=True):
            W -= lr * dw
            b -= lr * db

    step.params = cols  # type: ignore[attr-defined]  # for inspection
    return step


def torch_available() -> bool:
    """Whether PyTorch can be imported here (it is an optional dependency)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_cuda_available() -> bool:
    """PyTorch is importable and sees a CUDA device (the GPU peer)."""
    if not torch_available():
        return False
    import torch

    return bool(torch.cuda.is_available())


def make_torch_step(
    params: HostParams, x_rows: np.ndarray, y_rows: np.ndarray, lr: float, device: str = "cpu",
    dtype: str = "float32", matmul_precision: str = "default",
) -> Callable[[], None]:
    """PyTorch autograd peer: same network, ``torch.nn.functional``, SGD; ``() -> None``.

    ``step.params`` holds the ``(W, b)`` tensors it updates in place. On
    ``device="cuda"``: ``dtype="bfloat16"`` runs the products under
    ``torch.autocast`` (float32 master weights, as bpjax's mixed precision), and
    float32 products use TF32 unless ``matmul_precision="highest"``, matching what
    JAX does on the same GPU at each precision setting.
    """
    import torch
    from torch.nn import functional

    torch.set_num_threads(os.cpu_count() or 1)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = matmul_precision != "highest"
    ws = [torch.tensor(np.array(p["W"]), device=device, requires_grad=True) for p in params]
    bs = [torch.tensor(np.array(p["b"]), device=device, requires_grad=True) for p in params]
    x = torch.tensor(np.asarray(x_rows, np.float32), device=device)
    labels = torch.tensor(np.argmax(y_rows, axis=1), device=device)
    leaves = [t for pair in zip(ws, bs, strict=True) for t in pair]
    autocast = dtype == "bfloat16" and device != "cpu"

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            a = x
            for l, (W, b) in enumerate(zip(ws, bs, strict=True)):
                a = functional.linear(a, W, b)
                if l < len(ws) - 1:
                    a = functional.relu(a)
            loss = functional.cross_entropy(a.float(), labels)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for p, g in zip(leaves, grads, strict=True):
                p.sub_(g, alpha=lr)
        if device != "cpu":
            torch.cuda.synchronize()

    step.params = list(zip(ws, bs, strict=True))  # type: ignore[attr-defined]  # for inspection
    return step


PEER_STEPS: dict[str, Callable[..., Callable[[], None]]] = {
    "numpy": make_numpy_step,
    "torch": make_torch_step,
}  # name -> make_step(params, x_rows, y_rows, lr)
