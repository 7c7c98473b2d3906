import jax; jax.config.update("jax_num_cpu_devices", 8)  # noqa: E702  (before any device use)

# Test-wide JAX setup: float32 by default (tests that need float64 opt in locally),
# and implicit rank promotion is an error, to catch silent broadcasting.
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module.

    XLA:CPU maps each executable's code into memory; one process running the whole suite keeps
    thousands of them (about 9,000 memory maps after test_model + test_scaling alone), and once the
    kernel's `vm.max_map_count` (65,530 by default) is reached the next compile segfaults. Clearing
    the caches per module keeps the count near 1,000."""
    yield
    jax.clear_caches()
    gc.collect()
