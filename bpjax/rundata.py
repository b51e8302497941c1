"""A run's data: loaded and checked before its directory opens, split, recorded, re-checked.

``resolve`` loads what ``--dataset`` names (or takes a :class:`~bpjax.data.Dataset`
given in Python) and fills in ``Config.data_shape`` (n_0, n_L), so that the record,
``load_run`` and a resume know the network's sizes for any data; every fault of the
data is one line before anything is written. ``split`` holds out
``--validation_examples`` (a seeded permutation of the training rows: the first N are
the validation set, the rest keep their order), then ``--train_examples`` takes the
first rows of the rest, then ``--standardize`` scales every split with the mean and
standard deviation of those training rows only. ``record`` is what ``config.json``
keeps as ``data`` (the dataset's record, see ``bpjax.userdata``, plus the split);
``check_record`` refuses, in one line, a resume or ``--config`` repeat whose data no
longer has the recorded SHA-256, unless ``--accept_data_change``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from bpjax.data import Dataset, load_dataset, sha256_arrays
from bpjax.errors import ConfigError, DataError
from bpjax.rundir import EVENTS, read_jsonl
from bpjax.userdata import KEYS, load_file, parse_spec
from bpjax.validation import read_record

if TYPE_CHECKING:
    from bpjax.config import Config

SPLIT_STREAM = 0x5EED  # the validation split's generator: default_rng([seed, SPLIT_STREAM])


class Split(NamedTuple):
    """The rows a run trains, validates and tests on (NumPy, before casting and placing)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray


def load(config: Config) -> Dataset:
    """The dataset ``config.dataset`` names: a built-in one, or a file (``bpjax.userdata``)."""
    file = parse_spec(config.dataset)
    if config.label_column is not None and (file is None or file[0] != "csv"):
        raise ConfigError(f"--label_column names a CSV column; --dataset={config.dataset} is"
                          " not csv:TRAIN,TEST: drop --label_column")  # fmt: skip
    if file is None:
        return load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    return load_file(config.dataset, label_column=config.label_column)


def resolve(config: Config, dataset: Dataset | None) -> tuple[Config, Dataset]:
    """The data (loaded unless given) and ``config`` with its ``data_shape`` filled in.

    A ``data_shape`` given (recorded by the run being resumed) that the data does
    not have is refused: the checkpoint's network would not fit it.
    """
    data = load(config) if dataset is None else dataset
    shape = (int(np.prod(data.x_train.shape[1:])),
             data.num_classes or int(np.prod(data.y_train.shape[1:])))  # fmt: skip
    if config.data_shape not in (None, shape):
        raise ConfigError(
            f"--data_shape={','.join(map(str, config.data_shape))} (the features and outputs the"
            f" run recorded) but {data.name} has {shape[0]} features and {shape[1]} outputs:"
            " the data changed shape; start a new run (or drop --data_shape)"
        )
    return config.replace(data_shape=shape), data


def split(data: Dataset, config: Config) -> Split:
    """Hold-out, then ``--train_examples``, then ``--standardize`` (module docstring)."""
    n, held = data.x_train.shape[0], config.validation_examples
    if held >= n:
        raise ConfigError(f"--validation_examples={held} leaves none of the {n} training"
                          f" examples of {data.name} to train on: hold out fewer")  # fmt: skip
    x_val = y_val = None
    x_train, y_train = data.x_train, data.y_train
    if held:
        val, rest = _split_rows(n, held, config.seed)
        x_val, y_val, x_train, y_train = (data.x_train[val], data.y_train[val],
                                          data.x_train[rest], data.y_train[rest])  # fmt: skip
    available = x_train.shape[0]
    take = config.train_examples or available
    after = f" after the {held} held out for validation" if held else ""
    if take > available:
        raise ConfigError(f"--train_examples={take} exceeds the {available} training examples"
                          f" of {data.name}{after}")  # fmt: skip
    if config.batch > take:
        raise ConfigError(f"--batch={config.batch} is larger than the training set ({take}"
                          f" examples of {data.name}{after}): lower --batch")  # fmt: skip
    x_train, y_train = x_train[:take], y_train[:take]
    x_test = data.x_test
    if config.standardize:
        mean, std = _statistics(x_train)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        x_val = None if x_val is None else (x_val - mean) / std
    return Split(x_train, y_train, x_val, y_val, x_test, data.y_test)


def _split_rows(n: int, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation rows, training rows)``, each in increasing order, from ``seed``."""
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    return np.sort(order[:held]), np.sort(order[held:])


def _statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where a feature is constant), float32."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def record(data: Dataset, config: Config) -> dict[str, Any]:
    """``config.json``'s ``data``: the dataset's record, its split and scaling.

    A Dataset built directly (no record) is hashed as given: its name, shapes and
    the SHA-256 of its arrays (``bpjax.data.sha256_arrays``).
    """
    out = dict(data.record) if data.record is not None else {
        "dataset": data.name, "origin": "arrays given in Python", "classes": data.num_classes,
        "sha256": sha256_arrays({k: getattr(data, k) for k in KEYS}),
        "shapes": {k: list(getattr(data, k).shape) for k in KEYS}}  # fmt: skip
    held = config.validation_examples
    out["validation"] = None if not held else {
        "examples": held, "seed": config.seed, "stream": SPLIT_STREAM,
        "indices_sha256": hashlib.sha256(
            _split_rows(data.x_train.shape[0], held, config.seed)[0].astype("<i8")).hexdigest(),
    }  # fmt: skip
    out["standardize"] = ("per feature, with the mean and standard deviation of the training"
                          " rows (after the validation hold-out)") if config.standardize else None
    return out


def check_record(recorded: Mapping[str, Any] | None, now: Mapping[str, Any], spec: str, *,
                 accept: bool, accepted: Iterable[str] = ()) -> str | None:  # fmt: skip
    """Refuses (one line) data whose SHA-256 is not the one the run recorded.

    ``recorded``: ``config.json``'s ``data`` (None: a run made before data was
    recorded, trusted); ``accepted``: hashes earlier resumes accepted (events).
    Returns the new hash when ``accept`` lets a change through (for the record).
    """
    if not recorded or not recorded.get("sha256"):
        return None
    old, new = recorded["sha256"], now.get("sha256")
    if new == old or new in set(accepted):
        return None
    if accept:
        return new
    where = recorded.get("dataset", spec)
    size = (f", {recorded['bytes']} bytes then, {now['bytes']} now"
            if recorded.get("bytes") is not None and now.get("bytes") is not None else "")
    raise DataError(
        f"--dataset={spec}: the data changed since the run recorded it ({where}: sha256"
        f" {str(old)[:12]}..., now {str(new)[:12]}...{size}): restore it, or pass"
        " --accept_data_change to go on with the new data deliberately"
    )


def check_resumed(config: Config, now: Mapping[str, Any]) -> str | None:
    """:func:`check_record` against the run ``config`` resumes (None for a new run)."""
    path = os.path.join(config.workdir or "", "config.json")
    if not config.resume or not os.path.isfile(path):
        return None
    events = os.path.join(config.workdir, EVENTS)
    accepted = [e.get("sha256") for e in (read_jsonl(events) if os.path.exists(events) else [])
                if e.get("event") == "data_changed"]  # fmt: skip
    return check_record(read_record(path).get("data"), now, config.dataset,
                        accept=config.accept_data_change, accepted=accepted)  # fmt: skip
