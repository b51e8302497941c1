"""Test-wide settings: strict broadcasting, absl flags marked parsed; the opt-in
``highest_matmul_precision`` fixture for tests that compare float32 results tightly."""

import jax
import pytest
from absl import flags

# Hand-written backprop's classic bug is a (B,) against (B, 1) broadcast or a
# bias gradient summed over the wrong axis; make any implicit rank promotion an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
    # Any transitive absl user (orbax, ...) would otherwise raise UnparsedFlagAccessError.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    yield


@pytest.fixture
def highest_matmul_precision():
    """float32 matrix products exactly float32 for one test: ``"highest"`` precision.

    On A100/H100 GPUs float32 products default to TF32 (10-bit mantissa) and on
    TPUs to bfloat16 passes, so a float32 result compared at rtol 1e-4 or tighter
    (with float64, or with another float32 route) holds on a CPU only. Opt in per
    test or per module (``pytestmark = pytest.mark.usefixtures(...)``); it is scoped
    to the test, never a global toggle. jit reads the precision when it traces, so
    everything a test compiles inside sees it.
    """
    with jax.default_matmul_precision("highest"):
        yield
