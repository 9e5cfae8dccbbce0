"""`longseq.ops.gated_long_conv`: gate ⊙ (long_conv(u, k) + skip ⊙ u), one fused Monarch kernel where it
applies (interpret mode on CPU), against the same formula around the direct float64-checked convolution;
forward and gradients of u, gate, skip and k; f32 tight, bf16 loose; the unfused fallback and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import gated_long_conv, long_conv_direct
from longseq.ops.long_conv_monarch_pallas import gating_fuses


def random_inputs(seed, batch, seq, channels, kernel_len, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.standard_normal((batch, seq, channels)), dtype)
    gate = jnp.asarray(rng.standard_normal((batch, seq, channels)), dtype)
    skip = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    k = jnp.asarray(rng.standard_normal((channels, kernel_len)) / np.sqrt(kernel_len), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, seq, channels)), jnp.float32)
    return u, k, gate, skip, dy


def unfused(u, k, gate, skip, *, causal):
    return gate * (long_conv_direct(u, k, causal=causal) + skip * u)


def relative_error(actual, expected):
    expected = np.asarray(expected, np.float64)
    return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(np.abs(expected).max(), 1e-30)


# causal at a padded length, causal with a short kernel and channels off the tile, circular at a power of two
FUSED_CASES = [(300, 300, True, 3), (256, 100, True, 5), (512, 512, False, 2)]


@pytest.mark.parametrize("seq, kernel_len, causal, channels", FUSED_CASES)
def test_fused_gating_equals_the_unfused_formula(seq, kernel_len, causal, channels):
    assert gating_fuses(seq, kernel_len, channels, causal=causal)
    u, k, gate, skip, dy = random_inputs(seq + channels, 2, seq, channels, kernel_len)
    fused = jax.jit(lambda *a: gated_long_conv(*a, causal=causal, impl="monarch"))
    y, vjp = jax.vjp(fused, u, k, gate, skip)
    want, vjp_ref = jax.vjp(lambda *a: unfused(*a, causal=causal), u, k, gate, skip)
    assert relative_error(y, want) < 2e-6
    for got, expected, name in zip(vjp(dy), vjp_ref(dy), ("du", "dk", "dgate", "dskip")):
        assert got.shape == expected.shape, name
        assert relative_error(got, expected) < 5e-6, name


def test_fused_gating_in_bfloat16():
    u, k, gate, skip, dy = random_inputs(3, 2, 256, 4, 256, jnp.bfloat16)
    y, vjp = jax.vjp(jax.jit(lambda *a: gated_long_conv(*a, impl="monarch")), u, k, gate, skip)
    assert y.dtype == jnp.bfloat16
    u32, gate32 = u.astype(jnp.float32), gate.astype(jnp.float32)
    want, vjp_ref = jax.vjp(lambda u, k, g, s: unfused(u, k, g, s, causal=True), u32, k, gate32, skip)
    assert relative_error(y, want) < 3e-2
    for got, expected, name in zip(vjp(dy.astype(jnp.bfloat16)), vjp_ref(dy), ("du", "dk", "dgate", "dskip")):
        assert relative_error(got, expected) < 3e-2, name


@pytest.mark.parametrize("impl", ["fft", "direct", "monarch"])
def test_where_it_does_not_fuse_the_formula_runs(impl):
    """A circular convolution of a length that is not a power of two folds its output: not fused."""
    assert not gating_fuses(300, 300, 2, causal=False)
    u, k, gate, skip, dy = random_inputs(4, 2, 300, 2, 300)
    y, vjp = jax.vjp(lambda *a: gated_long_conv(*a, causal=False, impl=impl), u, k, gate, skip)
    want, vjp_ref = jax.vjp(lambda *a: unfused(*a, causal=False), u, k, gate, skip)
    assert relative_error(y, want) < 2e-6
    for got, expected in zip(vjp(dy), vjp_ref(dy)):
        assert relative_error(got, expected) < 5e-6


def test_bad_gate_and_skip_are_named():
    u, k, gate, skip, _ = random_inputs(5, 2, 64, 3, 64)
    with pytest.raises(ValueError, match=r"gate: expected the shape of u \(2, 64, 3\), got \(2, 64, 4\)"):
        gated_long_conv(u, k, jnp.ones((2, 64, 4)), skip)
    with pytest.raises(ValueError, match=r"skip: expected shape \(3,\) = \[channels\], got \(4,\)"):
        gated_long_conv(u, k, gate, jnp.ones(4))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_compiled_gated_kernel_on_gpu(dtype, tolerance):
    """impl='monarch' on a GPU (seq 1024: L = 2048), forward and gradients against the FFT formula."""
    assert gating_fuses(1024, 1024, 64, causal=True)
    u, k, gate, skip, dy = random_inputs(9, 2, 1024, 64, 1024, dtype)
    y, vjp = jax.vjp(jax.jit(lambda *a: gated_long_conv(*a, impl="monarch")), u, k, gate, skip)
    u32, gate32 = u.astype(jnp.float32), gate.astype(jnp.float32)
    want, vjp_ref = jax.vjp(lambda *a: gated_long_conv(*a, impl="fft"), u32, k, gate32, skip)
    assert relative_error(y, want) < tolerance
    for got, expected, name in zip(vjp(dy.astype(dtype)), vjp_ref(dy), ("du", "dk", "dgate", "dskip")):
        assert relative_error(got, expected) < tolerance, name
