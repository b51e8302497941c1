"""The one command to run when a GPU (or TPU) is lent: everything it must show, in stages.

On the accelerator machine (no network; JAX with its CUDA plugin, optax, orbax,
absl, chex, matplotlib, pytest and torch already there), from the checkout:

    pip install --no-deps --no-build-isolation -e .
    python experiments/device_check.py --data_dir=data/mnist

with ``data/mnist`` holding the four MNIST IDX ``.gz`` files (about 11 MB; copy
them from ``~/.cache/bpjax`` with ``python -c "import bpjax.idx ..."``, see the
README's "Accelerators" section; the folder is git-ignored and travels with the
working tree). It runs, each stage in its own process with its own time limit,
a failure in one never stopping the next:

1. ``env``: devices, versions, the default matmul precision;
2. ``tests``: the test files that run on any backend (gradient checks in float32
   at "highest" precision and float64, mixed precision, feedback rules, noise
   scale, export, training);
3. ``train``: the README's main command on the device, to 98% MNIST test accuracy;
4. ``bench_grad``: ``experiments/bench_grad.py`` (manual vs ``jax.grad``);
5. ``sweep_f32`` and ``sweep_bf16``: ``experiments/batch_sweep.py``, batches 1 to
   65536, manual and autodiff against PyTorch CUDA autograd, float32 and bfloat16;
6. ``study``: ``experiments/batch_study.py --quick`` on the device.

Everything goes to ``experiments/results/<platform>-<device kind>/`` (JSON with
metadata, CSV, PNG, each stage's log, ``summary.json``) and a summary table is
printed last. About 7 minutes on one H200 (the limits add up to under 8).
``--smoke`` runs the same stages with tiny settings, in about a minute on a
2-core CPU: CI runs ``python experiments/device_check.py --platform=cpu --smoke``
so the script is known to work before device minutes are spent on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import jax

from bpjax import cli
from bpjax.config import PLATFORMS, check_choices, setting
from bpjax.files import write_atomic
from bpjax.outputs import make_out_dir, writing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "tests", "train", "bench_grad", "sweep_f32", "sweep_bf16", "study")
TESTS = ["tests/test_formulas.py", "tests/test_methods.py", "tests/test_precision.py",
         "tests/test_feedback.py", "tests/test_noise_scale.py", "tests/test_export.py",
         "tests/test_train.py"]  # fmt: skip
SMOKE_TESTS = ["tests/test_formulas.py::test_float32_matches_float64_reference",
               "tests/test_export.py::test_export_the_sweeps_step"]  # fmt: skip
SWEEP_BATCHES = ",".join(str(2**k) for k in range(17))  # 1 .. 65536


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    platform: str = setting("gpu", "The device to check.", choices=PLATFORMS)
    smoke: bool = setting(False, "Tiny settings for every stage (CI runs this on the CPU).")
    data_dir: str | None = setting(None, "The four MNIST IDX files (.gz): no network there.")
    out_dir: str | None = setting(None, "Default: experiments/results/<platform>-<device>/.")
    stages: tuple[str, ...] = setting(STAGES, "Stages to run.", choices=STAGES)

    def __post_init__(self) -> None:  # a list flag's values are checked here, up front
        check_choices("stages", self.stages, STAGES)


def stage_commands(s: CheckSettings, out: str) -> dict[str, tuple[list[str], float]]:
    """``{stage: (argv after the interpreter, time limit in seconds)}`` for these settings."""
    py = [sys.executable]
    data = [f"--data_dir={s.data_dir}"] if s.data_dir else []
    smoke = s.smoke
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
             *(SMOKE_TESTS if smoke else TESTS)]  # fmt: skip
    train = ["launch.py", f"--platform={s.platform}", *data, f"--workdir={out}/train_run",
             *(["--epochs=1", "--train_examples=2000"] if smoke else
               ["--epochs=40", "--target_accuracy=0.98"])]  # fmt: skip
    grad = ["experiments/bench_grad.py", f"--out={out}/bench_grad.json",
            *(["--batches=1,128", "--min_time_s=0.05", "--repeats=3"] if smoke
              else [])]  # fmt: skip
    sweep = ["experiments/batch_sweep.py", f"--platforms={s.platform}", "--isolate=never",
             "--methods=manual,autodiff", "--peers=torch",
             *(["--batches=1,64", "--min_time_s=0", "--repeats=2", "--warmup=1",
                "--matmul_max_n=512"] if smoke else
               [f"--batches={SWEEP_BATCHES}", "--min_time_s=0.3", "--repeats=5"])]  # fmt: skip
    study = ["experiments/batch_study.py", "--quick", f"--platforms={s.platform}", *data,
             f"--out_dir={out}/batch_study",
             f"--runs_dir={out}/batch_study_runs" if smoke else "--runs_dir=runs/device_study",
             *(["--batches=32,64", "--lrs_per_batch=1", "--max_epochs=1", "--evals_per_epoch=2",
                "--train_examples=2048", "--target_accuracy=0.5"] if smoke else [])]  # fmt: skip
    def limit(full: float) -> float:  # smoke: slow CPUs, tiny work; full: the device's budget
        return 120.0 if smoke else full

    return {
        "env": ([*py, "-c", ENV_PROBE, f"{out}/env.json"], limit(30)),
        "tests": ([*py, *tests], limit(100)),
        "train": ([*py, *train], limit(75)),
        "bench_grad": ([*py, *grad], limit(45)),
        "sweep_f32": ([*py, *sweep, f"--out_dir={out}/sweep_f32"], limit(80)),
        "sweep_bf16": (
            [*py, *sweep, "--dtype=bfloat16", f"--out_dir={out}/sweep_bf16"], limit(50)
        ),
        "study": ([*py, *study], limit(90)),
    }


ABSL_LOG = re.compile(r"[IWEF]\d{4} ")  # absl's log lines (JAX's backend probing, ...)

ENV_PROBE = """
import json, sys, jax, jaxlib, numpy, optax
from bpjax.bench.timing import device_info
info = {"devices": [str(d) for d in jax.devices()], **device_info()}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
except ImportError:
    info["torch"] = None
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
"""


def run_stage(name: str, argv: list[str], limit_s: float, out: str) -> dict[str, object]:
    """Runs one stage in its own process; its output goes to ``<out>/<name>.log``."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit_s:.0f}s"
        text = "".join(x.decode() if isinstance(x, bytes) else (x or "")
                       for x in (e.stdout, e.stderr))  # fmt: skip
    write_atomic(os.path.join(out, f"{name}.log"), " ".join(argv) + "\n\n" + text)
    lines = [x for x in text.strip().splitlines() if x.strip() and not ABSL_LOG.match(x)]
    last = lines[-1:] or [""]
    return {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "last_line": last[0][:300]}  # fmt: skip


def default_out_dir(platform: str) -> str:
    try:
        kind = jax.devices(platform)[0].device_kind
    except RuntimeError:
        kind = "unavailable"
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return os.path.join(ROOT, "experiments", "results", f"{platform}-{slug}")


def main(argv: list[str]) -> None:
    del argv
    settings = cli.from_flags(CheckSettings)
    out = os.path.abspath(settings.out_dir or default_out_dir(settings.platform))
    make_out_dir("out_dir", out)  # a file or a read-only place: refused before any stage
    commands = stage_commands(settings, out)
    results = []
    with writing("out_dir", out):  # each stage's log, then the summary (a full disk: one line)
        for name in settings.stages:
            argv, limit = commands[name]
            print(f"[{name}] running (limit {limit:.0f}s) ...", flush=True)
            results.append(run_stage(name, argv, limit, out))
            print(f"[{name}] {results[-1]['status']} in {results[-1]['seconds']}s: "
                  f"{results[-1]['last_line']}", flush=True)  # fmt: skip
        summary = {"settings": dataclasses.asdict(settings), "out_dir": out, "stages": results}
        write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(f"\n{'stage':11} {'status':28} {'seconds':>7}")
    for r in results:
        print(f"{r['stage']:11} {r['status']:28} {r['seconds']:7.1f}")
    print(f"results in {out}")
    if any(r["status"] != "ok" for r in results):
        sys.exit(1)


cli.define_flags(CheckSettings)

if __name__ == "__main__":
    cli.run(main)
