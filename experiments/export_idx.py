"""Writes a dataset's four IDX files (gzip), for a machine without network.

    python experiments/export_idx.py --dataset=mnist --out=data/mnist

reads the verified dataset (cache or fetch), writes ``train-images-idx3-ubyte.gz``
and the three others (about 11 MB for MNIST) into ``--out`` and reads them back
through ``load_dataset(..., data_dir=...)``, which checks every array's SHA-256:
what is written is exactly the dataset. ``data/`` is git-ignored; copy the folder
with the checkout (the GPU machine's ``carry``) and pass ``--data_dir=data/mnist``
there. A second or so.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from bpjax import cli
from bpjax.config import setting
from bpjax.data import load_dataset
from bpjax.errors import ConfigError
from bpjax.idx import IDX_FILES, write_idx
from bpjax.outputs import check_out_dir, make_out_dir, writing


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    dataset: str = setting("mnist", "Image dataset to export.", choices=("mnist", "fashion_mnist"))
    out: str = setting("data/mnist", "Directory for the four .gz files (created).")


cli.define_flags(ExportSettings)


def main(argv: list[str]) -> None:
    del argv
    s = cli.from_flags(ExportSettings)
    check_out_dir("out", s.out)  # before loading: an unwritable --out costs nothing
    data = load_dataset(s.dataset)
    make_out_dir("out", s.out)
    for key, base in IDX_FILES.items():
        array = getattr(data, key)
        if key.startswith("x"):  # float32 in [0, 1] back to the uint8 pixels (x = u8 / 255)
            array = np.rint(array * np.float32(255)).astype(np.uint8).reshape(-1, 28, 28)
        else:
            array = array.astype(np.uint8)
        with writing("out", s.out):
            write_idx(os.path.join(s.out, f"{base}.gz"), array)
    check = load_dataset(s.dataset, data_dir=s.out)  # SHA-256 of every decoded array
    if not np.array_equal(check.x_test, data.x_test):
        raise ConfigError(f"{s.out}: the files read back differ from the dataset")
    print(f"wrote {', '.join(f'{b}.gz' for b in IDX_FILES.values())} to {s.out}: verified")


if __name__ == "__main__":
    cli.run(main)
