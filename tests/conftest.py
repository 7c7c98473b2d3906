import jax; jax.config.update("jax_num_cpu_devices", 8)  # noqa: E702  (before any device use)

# Test-wide JAX setup: float32 by default (tests that need float64 opt in locally),
# and implicit rank promotion is an error, to catch silent broadcasting.
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")
