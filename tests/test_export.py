"""Every jitted program the project runs lowers for GPU and TPU, tested on this CPU.

``jax.export`` lowers a function for platforms this machine does not have; a
program that uses something only the CPU backend has (a host callback, a CPU-only
custom call, a dtype a platform lacks) fails here, before GPU minutes are spent.
``pytest -k export`` selects these tests. The data-parallel forms are exported
on 8 simulated devices in ``tests/parallel_worker.py`` (its own process).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import export
from test_train import TOY

from bpjax.bench.steps import sgd_state, sgd_step
from bpjax.config import Config
from bpjax.evaluation import Evaluator
from bpjax.methods import METHODS
from bpjax.network import Net
from bpjax.parallel import Placement
from bpjax.training import EpochProgram, init_state, prepare_data

PLATFORMS = ("cuda", "tpu")
SMALL = dict(hidden=(8,), batch=16, dataset="mnist")


def exported(fn, args):
    """``fn`` lowered for CUDA and TPU from this CPU; the serialized module is non-empty."""
    exp = export.export(fn, platforms=PLATFORMS)(*args)
    assert exp.platforms == PLATFORMS and len(exp.mlir_module_serialized) > 1000
    return exp


def epoch_program(**fields):
    config = Config(**{**SMALL, **fields})
    place = Placement(jax.devices("cpu")[0])
    data = prepare_data(TOY, config, place)
    sizes = (data.x_train.shape[1], *config.hidden, data.y_train.shape[1])
    state = init_state(config, sizes, place)
    return config, data, state, EpochProgram(config, place, state, data, classify=True)


@pytest.mark.parametrize("method", METHODS)
def test_export_training_epoch_of_every_method(method):
    _, _, _, program = epoch_program(method=method)
    exported(program.jitted, program.args)


@pytest.mark.parametrize("rule", ["fa", "dfa", "sign", "kp", "usf", "brsf", "frsf"])
def test_export_training_epoch_of_every_feedback_rule(rule):
    _, _, _, program = epoch_program(feedback=rule)
    exported(program.jitted, program.args)


@pytest.mark.parametrize(
    "fields",
    [dict(dp_clip=1.0, dp_noise=0.5), dict(noise_scale=True), dict(eval_every_steps=2),
     dict(lr_schedule="warmup_cosine", warmup_epochs=1.0, optimizer="momentum"),
     dict(dtype="bfloat16")],
    ids=["dp_sgd", "noise_scale", "chunked", "schedule", "bfloat16"],
)
def test_export_training_epoch_variants(fields):
    _, _, _, program = epoch_program(**fields)
    exported(program.jitted, program.args)


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_export_evaluation_and_alignment(rule):
    config, data, state, _ = epoch_program(feedback=rule)
    measure = Evaluator(config, data, classify=True)
    exported(measure.test, (state.params, data.x_test, data.y_test))
    if rule != "bp":
        exported(measure.align, (state.params, state.feedback, *measure.fixed))


@pytest.mark.parametrize("method", METHODS)
def test_export_the_sweeps_step(method):
    step, _ = sgd_step(Net.mlp((12, 8, 3)), method, lr=0.1)
    rng = np.random.default_rng(0)
    params = [{"W": rng.normal(size=(8, 12)).astype(np.float32), "b": np.zeros(8, np.float32)},
              {"W": rng.normal(size=(3, 8)).astype(np.float32), "b": np.zeros(3, np.float32)}]
    x = rng.normal(size=(16, 12)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    exported(step, (sgd_state(params), x, y))
