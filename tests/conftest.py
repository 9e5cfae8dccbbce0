"""Test-session settings.

Float32 tests compare against float64 references with tight tolerances. On GPUs, XLA's default
float32 matmul precision is TF32 (10-bit mantissa), which would fail them for reasons unrelated to
the code under test: the tests pin full float32 precision. (Subprocess tests inherit it through the
environment variable.)
"""

import os

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
