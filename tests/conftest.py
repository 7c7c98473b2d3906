import jax; jax.config.update("jax_num_cpu_devices", 8)  # noqa: E702  (before any device use)

# Test-wide JAX setup: float32 by default (tests that need float64 opt in locally),
# and implicit rank promotion is an error, to catch silent broadcasting.
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")

import atexit  # noqa: E402
import gc  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# A persistent compilation cache, fresh for each test session: many tests build their own jitted
# steps (a new closure, a new jit object) around the same computation, and XLA keys this cache by the
# computation itself, so the second and later builds load the executable instead of compiling it.
# Measured side by side here: test_objectives_continual + test_contractive 204 s → 104 s, and
# test_alignment 106 s → 87 s. Starting empty keeps every session honest (nothing from an earlier
# checkout is reused).
_CACHE_DIR = tempfile.mkdtemp(prefix="arlm-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


_MAPS_BEFORE_CLEARING = 20_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:            # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after a test module once the process holds many of them.

    XLA:CPU maps each executable's code into memory; one process running the whole suite keeps
    thousands of them (about 9,000 memory maps after test_model + test_scaling alone), and once the
    kernel's `vm.max_map_count` (65,530 by default) is reached the next compile segfaults. Past
    20,000 maps the caches are cleared (back to about 1,000); below that they are kept, so the
    modules share their compiled eager ops."""
    yield
    if _memory_maps() > _MAPS_BEFORE_CLEARING:
        jax.clear_caches()
        gc.collect()


_SLOW_LIST = pathlib.Path(__file__).with_name("slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """Mark `slow` the tests that tests/slow_tests.txt names (measured over 5 s each on 2 cores)."""
    slow = {line.strip() for line in _SLOW_LIST.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    root = pathlib.Path(str(config.rootpath))
    for item in items:
        nodeid = item.nodeid
        if not nodeid.startswith("tests/"):          # pytest run from inside tests/
            nodeid = str(pathlib.Path(item.path).relative_to(root)) + "::" + nodeid.split("::", 1)[-1]
        if nodeid in slow:
            item.add_marker(pytest.mark.slow)
