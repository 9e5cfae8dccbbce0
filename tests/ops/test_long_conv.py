"""longseq.ops.long_conv (FFT) and long_conv_direct against a float64 NumPy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import LONG_CONV_IMPLS, long_conv, long_conv_direct
from longseq.ops.long_conv import fft_size

# Compiled once per shape: much faster on CPU than eager op-by-op dispatch. The invalid-input
# and impl tests cover the eager path.
long_conv_jit = jax.jit(long_conv, static_argnames=("causal", "impl"))
long_conv_direct_jit = jax.jit(long_conv_direct, static_argnames=("causal",))


def numpy_conv(u, k, *, causal):
    """y[:, t] = Σ_s k[:, lag] · u[:, s] with lag = t − s (causal) or (t − s) mod seq (circular)."""
    u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
    seq, kernel_len = u.shape[1], k.shape[1]
    y = np.zeros(u.shape)
    for t in range(seq):
        for s in range(seq):
            lag = t - s if causal else (t - s) % seq
            if 0 <= lag < kernel_len:
                y[:, t] += k[:, lag] * u[:, s]
    return y


def random_inputs(rng, batch, seq, channels, kernel_len, dtype=np.float32):
    u = jnp.asarray(rng.standard_normal((batch, seq, channels)), dtype)
    k = jnp.asarray(rng.standard_normal((channels, kernel_len)) / np.sqrt(kernel_len), dtype)
    return u, k


def assert_close(actual, expected, tol):
    """Relative to the largest magnitude of expected, so that near-zero entries do not dominate."""
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale)


CASES = [  # (seq, kernel_len)
    (1, 1),
    (7, 3),
    (7, 7),
    (31, 1),
    (31, 16),
    (31, 31),
    (100, 37),
    (100, 100),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq, kernel_len", CASES)
def test_fft_and_direct_match_numpy(seq, kernel_len, causal):
    rng = np.random.default_rng(1000 + 10 * seq + kernel_len + causal)
    u, k = random_inputs(rng, batch=2, seq=seq, channels=3, kernel_len=kernel_len)
    want = numpy_conv(u, k, causal=causal)
    y = long_conv_jit(u, k, causal=causal)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert_close(y, want, 1e-5)
    assert_close(long_conv_direct_jit(u, k, causal=causal), want, 1e-5)


def test_causal_output_ignores_the_future():
    """Changing u after position t must leave y[:, :t+1] unchanged (and must change the circular y)."""
    rng = np.random.default_rng(2001)
    u, k = random_inputs(rng, batch=1, seq=12, channels=2, kernel_len=12)
    u2 = u.at[:, 8:].set(jnp.asarray(rng.standard_normal((1, 4, 2)), jnp.float32))
    y, y2 = long_conv_jit(u, k, causal=True), long_conv_jit(u2, k, causal=True)
    np.testing.assert_allclose(np.asarray(y[:, :8]), np.asarray(y2[:, :8]), atol=1e-5)
    c, c2 = long_conv_jit(u, k, causal=False), long_conv_jit(u2, k, causal=False)
    assert np.abs(np.asarray(c[:, :8]) - np.asarray(c2[:, :8])).max() > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_fft_grads_match_direct(causal):
    rng = np.random.default_rng(3001 + causal)
    u, k = random_inputs(rng, batch=2, seq=31, channels=3, kernel_len=17)
    w = jnp.asarray(rng.standard_normal(u.shape), jnp.float32)

    def grads(conv):
        return jax.jit(jax.grad(lambda u, k: jnp.sum(conv(u, k, causal=causal) * w), argnums=(0, 1)))(u, k)

    got, want = grads(long_conv), grads(long_conv_direct)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        assert_close(g, r, 1e-4)


def test_bfloat16_matches_numpy_loosely():
    rng = np.random.default_rng(4001)
    u, k = random_inputs(rng, batch=2, seq=33, channels=4, kernel_len=20, dtype=jnp.bfloat16)
    for causal in (True, False):
        y = long_conv_jit(u, k, causal=causal)
        assert y.dtype == jnp.bfloat16
        # NumPy sees exactly the bf16-rounded inputs, so only the op's own rounding is measured.
        assert_close(y, numpy_conv(u, k, causal=causal), 2e-2)


def test_impl_fft_equals_auto():
    rng = np.random.default_rng(5001)
    u, k = random_inputs(rng, batch=2, seq=9, channels=2, kernel_len=5)
    assert LONG_CONV_IMPLS == ("auto", "fft", "monarch", "direct")
    np.testing.assert_array_equal(np.asarray(long_conv(u, k, impl="auto")),
                                  np.asarray(long_conv(u, k, impl="fft")))


def test_fft_size_is_the_smallest_5_smooth_number_not_below_n():
    def is_5_smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 400):
        want = next(m for m in range(n, 2 * n + 1) if is_5_smooth(m))
        assert fft_size(n) == want, n


@pytest.mark.parametrize(
    "u_shape, k_shape, dtype, match",
    [
        ((8, 3), (3, 4), jnp.float32, r"^u: expected rank 3"),
        ((2, 8, 3), (3,), jnp.float32, r"^k: expected rank 2"),
        ((2, 8, 3), (4, 4), jnp.float32, r"^k: expected 3 channels"),
        ((2, 8, 3), (3, 9), jnp.float32, r"^k: expected 1 <= kernel_len <= seq=8, got kernel_len=9"),
        ((2, 8, 3), (3, 0), jnp.float32, r"^k: expected 1 <= kernel_len <= seq=8, got kernel_len=0"),
        ((2, 8, 3), (3, 4), jnp.int32, r"^u: expected a floating dtype"),
    ],
)
@pytest.mark.parametrize("fn", [long_conv, long_conv_direct])
def test_invalid_shapes_raise(fn, u_shape, k_shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.zeros(u_shape, dtype), jnp.zeros(k_shape, jnp.float32))


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match=r"^impl: expected one of 'auto', 'fft', 'monarch', 'direct', got 'foo'$"):
        long_conv(jnp.zeros((1, 4, 2)), jnp.zeros((2, 2)), impl="foo")
