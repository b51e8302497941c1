"""Test-wide settings: strict broadcasting, absl flags marked parsed."""

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
