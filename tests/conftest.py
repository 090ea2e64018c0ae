"""Test session set-up: 8 fake CPU devices (before JAX is imported anywhere) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exact fp32 matmuls on CPU, also in the subprocesses some tests start (training runs compared bitwise).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

# The persistent compilation cache, as every gdsd-jax command uses it, for this process and the CLI processes
# tests start (they inherit the environment): a program compiled by one test, or by an earlier run of the
# suite, is loaded instead of compiled again. GDSD_JAX_COMPILATION_CACHE=off runs the suite without it.
from gdsd_jax.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()

import jax  # noqa: E402

# Exact fp32 matmuls on CPU: parity tolerances are set for true fp32, not reduced-precision passes.
jax.config.update("jax_default_matmul_precision", "highest")
