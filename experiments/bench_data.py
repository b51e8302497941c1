"""Loading your own 60,000x784 npz against loading the MNIST cache (issue 23).

    python experiments/bench_data.py            # 7 repeats each: about 10 s

Times ``load_dataset("mnist")`` (the cache: ``np.load``, every array's SHA-256
checked against the table, uint8 scaled to float32) and ``--dataset=npz:PATH`` through
``bpjax.userdata.load_file`` (``np.load(allow_pickle=False)``, every check of a user's
file, the SHA-256 of the decoded arrays, the same scaling) on the same arrays written
as a user would (``np.savez`` of uint8 ``(60000, 28, 28, 1)`` images). Reports the
median of ``--repeats`` loads of each, alternating, and their ratio (npz / cache).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np

from bpjax import cli
from bpjax.config import setting
from bpjax.data import load_dataset
from bpjax.userdata import load_file


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    repeats: int = setting(7, "Loads of each; the median is reported.")


cli.define_flags(BenchSettings)


def _time(load) -> float:
    t0 = time.perf_counter()
    load()
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    del argv
    s = cli.from_flags(BenchSettings)
    mnist = load_dataset("mnist", progress=False)  # cached (fetched once if need be)
    with tempfile.TemporaryDirectory(prefix="bpjax-bench-data-") as tmp:
        path = os.path.join(tmp, "mine.npz")
        pixels = {k: np.rint(getattr(mnist, k) * np.float32(255)).astype(np.uint8)
                  for k in ("x_train", "x_test")}  # fmt: skip
        np.savez(path, x_train=pixels["x_train"].reshape(-1, 28, 28, 1), y_train=mnist.y_train,
                 x_test=pixels["x_test"].reshape(-1, 28, 28, 1), y_test=mnist.y_test)
        mine = load_file(f"npz:{path}")
        assert np.array_equal(mine.x_train, mnist.x_train)  # the same data, scaled the same
        cache, npz = [], []
        for _ in range(s.repeats):
            cache.append(_time(lambda: load_dataset("mnist", progress=False)))
            npz.append(_time(lambda: load_file(f"npz:{path}")))
        size = os.path.getsize(path)
    a, b = statistics.median(cache), statistics.median(npz)
    print(f"MNIST cache load_dataset('mnist'): median {a:.3f} s over {s.repeats}")
    print(f"npz:PATH 60000x28x28x1 uint8 ({size / 1e6:.1f} MB): median {b:.3f} s over"
          f" {s.repeats}")
    print(f"ratio npz / cache: {b / a:.2f}")


if __name__ == "__main__":
    cli.run(main)
