"""The Mosaic GPU Monarch long-conv prototype (experiments/long_conv_kernel/monarch_mgpu.py), run by the Pallas
GPU interpreter on CPU against jnp.fft, and lowered for CUDA (which checks shared memory and layouts)."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments" / "long_conv_kernel"))
import monarch_mgpu  # noqa: E402


def _rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def _inputs(n, batch=3, channels=5, kernel_len=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(keys[0], (batch, channels, n), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (channels, kernel_len or n), jnp.float32) / np.sqrt(n)
    dy = jax.random.normal(keys[2], (batch, channels, n), jnp.float32).astype(jnp.bfloat16)
    return u, k, dy


def test_factorisation_is_the_linear_convolution():
    assert monarch_mgpu._numpy_model(1024) < 1e-12


@pytest.mark.parametrize("n, kernel_len", [(1024, 1024), (2048, 77)])
def test_kernel_spectrum_by_matmuls_equals_fft(n, kernel_len):
    k = jax.random.normal(jax.random.key(n), (4, kernel_len), jnp.float32)
    by_fft = monarch_mgpu.kernel_spectrum_fft(k, n)
    by_matmuls = monarch_mgpu.kernel_spectrum(k, n, precision=jax.lax.Precision.HIGHEST)
    assert by_matmuls.shape == (4, 2, 2, 64, 2 * n // 128)
    assert _rel_err(by_matmuls, by_fft) < 1e-5


@pytest.mark.parametrize("batch, options", [
    (3, dict(row_major=True, ctas=2)),  # 9 rows over 4 warpgroups
    (3, dict(group=1, ctas=2)),  # 3 channels over 4 warpgroups: one gets none
    (4, dict(group=4, ctas=1)),  # 3 channels over 2 warpgroups: one gets two
    (4, dict(group=2, ctas=1, wgs=1, table_dtype=jnp.bfloat16)),
])
def test_forward_matches_fft(batch, options):
    n = 1024
    u, k, _ = _inputs(n, batch=batch, channels=3, kernel_len=n - 3)  # a kernel shorter than u
    y = monarch_mgpu.long_conv_bhn(u, k, **{"wgs": 2, **options}, interpret=monarch_mgpu.interpret_params())
    assert y.shape == u.shape and y.dtype == u.dtype
    assert _rel_err(y, monarch_mgpu.reference_bhn(u.astype(jnp.float32), k)) < 1e-2


@pytest.mark.parametrize("n, batch, row_major", [(2048, 2, True), (1024, 4, False)])
def test_gradients_match_fft(n, batch, row_major):
    u, k, dy = _inputs(n, batch=batch, channels=2, seed=1)

    def loss(conv):
        return lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    conv = functools.partial(monarch_mgpu.long_conv_bhn, ctas=2, row_major=row_major,
                             interpret=monarch_mgpu.interpret_params())
    du, dk = jax.grad(loss(conv), (0, 1))(u, k)
    want_du, want_dk = jax.grad(loss(lambda u, k: monarch_mgpu.reference_bhn(u.astype(jnp.float32), k)), (0, 1))(
        u.astype(jnp.float32), k)
    assert du.dtype == u.dtype and dk.dtype == k.dtype
    assert _rel_err(du, want_du) < 1e-2
    assert _rel_err(dk, want_dk) < 1e-2


def test_group_must_divide_the_batch():
    u, k, _ = _inputs(1024, batch=3, channels=2)
    rows = u.reshape(6, 1024)
    with pytest.raises(ValueError, match="group: 2 must divide the batch 3"):
        monarch_mgpu.long_conv_grouped(rows, monarch_mgpu.kernel_spectrum(k, 1024), monarch_mgpu.constants(1024),
                                       channels=2, group=2, interpret=monarch_mgpu.interpret_params())


@pytest.mark.parametrize("n", [1024, 2048, 4096])
def test_lowers_for_cuda_within_shared_memory(n):
    u = jax.ShapeDtypeStruct((8, 768, n), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((768, n), jnp.float32)
    grad = jax.grad(lambda u, k: jnp.sum(monarch_mgpu.long_conv_bhn(u, k).astype(jnp.float32)), (0, 1))
    exported = jax.export.export(jax.jit(grad), platforms=["cuda"])(u, k)
    assert "mosaic_gpu" in exported.mlir_module()


def test_unsupported_length_is_refused():
    u, k, _ = _inputs(512, batch=1, channels=2)
    with pytest.raises(ValueError, match="1024, 2048, 4096"):
        monarch_mgpu.long_conv_bhn(u, k, interpret=monarch_mgpu.interpret_params())


def test_passes_factorisation_is_the_linear_convolution():
    import monarch_passes

    for n in (1024, 16384, 1 << 20):  # two factors, three factors of 16, three of 128
        assert monarch_passes._numpy_model(n) < 1e-12


@pytest.mark.parametrize("n", [1024, 16384])  # three passes (two factors), five (three factors)
def test_passes_match_fft(n):
    import monarch_passes

    u, k, dy = _inputs(n, batch=2, channels=3, kernel_len=n - 5)

    def loss(conv):
        return lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    def reference(u, k):
        return monarch_mgpu.reference_bhn(u.astype(jnp.float32), k)

    conv = functools.partial(monarch_passes.long_conv_bhn, interpret=True)
    y = conv(u, k)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert _rel_err(y, reference(u, k)) < 1e-2
    du, dk = jax.grad(loss(conv), (0, 1))(u, k)
    want_du, want_dk = jax.grad(loss(reference), (0, 1))(u.astype(jnp.float32), k)
    assert _rel_err(du, want_du) < 1e-2
    assert _rel_err(dk, want_dk) < 1e-2


@pytest.mark.parametrize("shape, calls", [((8, 768, 4096), 3), ((4, 768, 65536), 5)])
def test_passes_lower_through_triton(shape, calls):
    import monarch_passes

    u = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = jax.ShapeDtypeStruct(shape[1:], jnp.float32)
    exported = jax.export.export(
        jax.jit(monarch_passes.long_conv_bhn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(u, k)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("n", [512, 3000, 1 << 21])
def test_passes_refuse_other_lengths(n):
    import monarch_passes

    with pytest.raises(ValueError, match="powers of two from 1024 to 1048576"):
        monarch_passes.plan(n)
