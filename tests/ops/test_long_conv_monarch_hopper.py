"""The Hopper (Mosaic GPU) Monarch long convolution, run by the Pallas GPU interpreter on CPU against the FFT
implementation, lowered for CUDA (which checks shared memory and layouts), and its dispatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import gated_long_conv, long_conv
from longseq.ops import long_conv_monarch_hopper as hopper


def _rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def _inputs(seq, batch, channels, kernel_len, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(keys[0], (batch, seq, channels), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (channels, kernel_len), jnp.float32) / np.sqrt(seq)
    dy = jax.random.normal(keys[2], (batch, seq, channels), jnp.float32).astype(jnp.bfloat16)
    return u, k, dy


def _reference(u, k):
    return long_conv(u.astype(jnp.float32), k, impl="fft")


def _rows(u):
    """[batch, n, channels] -> the kernels' [batch · channels, n]."""
    return u.transpose(0, 2, 1).reshape(-1, u.shape[1])


def test_factorisation_is_the_linear_convolution():
    assert hopper._numpy_model(1024) < 1e-12


@pytest.mark.parametrize("n, kernel_len", [(1024, 1024), (2048, 77)])
def test_kernel_spectrum_is_the_dft_in_the_kernels_order(n, kernel_len):
    k = np.random.default_rng(n).standard_normal((3, kernel_len))
    got = np.asarray(hopper.kernel_spectrum(jnp.asarray(k, jnp.float32), n), np.float64)
    r2 = 2 * n // 128
    assert got.shape == (3, 2, 2, 64, r2)
    spectrum = got[:, 0] + 1j * got[:, 1]                                       # [channels, half, 64, r2]
    k1, k2 = np.arange(128)[:, None], np.arange(r2)[None, :]
    dft = np.exp(-2j * np.pi * (k1 + 128 * k2)[..., None] * np.arange(kernel_len) / (2 * n)) / (2 * n)
    want = np.einsum("abt,ct->cab", dft, k).reshape(3, 2, 64, r2)
    assert np.abs(spectrum - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("batch, group, ctas, wgs, conj_khat", [
    (3, 1, 2, 2, False),  # 3 channels over 4 warpgroups: one gets none
    (4, 4, 1, 2, False),  # 3 channels over 2 warpgroups: one gets two, 4 rows per phase
    (4, 2, 1, 1, True),   # the correlation: y[t] = Σ_s k[s - t] u[s]
])
def test_conv_rows_matches_fft(batch, group, ctas, wgs, conj_khat):
    n = 1024
    u, k, _ = _inputs(n, batch, channels=3, kernel_len=n - 3)  # a kernel shorter than u
    y = hopper.conv_rows(_rows(u), hopper.kernel_rows(k, n), channels=3, conj_khat=conj_khat, group=group,
                         ctas=ctas, wgs=wgs, interpret=hopper.interpret_params())
    assert y.shape == (batch * 3, n) and y.dtype == jnp.bfloat16
    if conj_khat:  # the correlation is the convolution of the reversed sequence
        want = _reference(u[:, ::-1], k)[:, ::-1]
    else:
        want = _reference(u, k)
    assert _rel_err(y, _rows(want)) < 1e-2


@pytest.mark.parametrize("seq, batch, kernel_len", [(1000, 4, 1000), (1500, 1, 31)])  # padded to 1024, 2048
def test_forward_and_gradients_match_fft(seq, batch, kernel_len):
    u, k, dy = _inputs(seq, batch, channels=2, kernel_len=kernel_len, seed=1)

    def loss(conv):
        return lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    @jax.jit  # the output and the gradients in one compiled call (the interpreter: the default on a CPU device)
    def output_and_grads(u, k, dy):
        y, pullback = jax.vjp(hopper.long_conv_monarch_hopper, u, k)
        return y, *pullback(dy)

    y, du, dk = output_and_grads(u, k, dy)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert _rel_err(y, _reference(u, k)) < 1e-2
    want_du, want_dk = jax.grad(loss(_reference), (0, 1))(u.astype(jnp.float32), k)
    assert du.dtype == u.dtype and dk.dtype == k.dtype
    assert _rel_err(du, want_du) < 1e-2
    assert _rel_err(dk, want_dk) < 1e-2


@pytest.mark.parametrize("n", [1024, 2048, 4096])
def test_lowers_for_cuda_within_shared_memory(n):
    u = jax.ShapeDtypeStruct((8, n, 768), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((768, n), jnp.float32)
    conv = functools.partial(hopper.long_conv_monarch_hopper, interpret=False, ctas=132)
    grad = jax.grad(lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32)), (0, 1))
    exported = jax.export.export(jax.jit(grad), platforms=["cuda"])(u, k)
    assert exported.mlir_module().count("mosaic_gpu") >= 3  # y, du, K̂'s cotangent


@pytest.mark.parametrize("seq, kernel_len, dtype, causal, applies", [
    (1024, 1024, jnp.bfloat16, True, True),
    (513, 5, jnp.bfloat16, True, True),
    (512, 5, jnp.bfloat16, True, False),     # shorter: the portable kernel
    (4097, 5, jnp.bfloat16, True, False),    # longer
    (2048, 5, jnp.float32, True, False),
    (2048, 5, jnp.bfloat16, False, False),   # circular
])
def test_applies(seq, kernel_len, dtype, causal, applies):
    assert hopper.applies(seq, kernel_len, dtype, causal=causal) == applies


def test_bad_input_is_refused():
    u, k, _ = _inputs(512, batch=1, channels=2, kernel_len=512)
    with pytest.raises(ValueError, match="513 <= seq <= 4096"):
        hopper.long_conv_monarch_hopper(u, k)
    rows = _rows(_inputs(1024, batch=3, channels=2, kernel_len=8)[0])
    with pytest.raises(ValueError, match="group: 2 must divide the batch 3"):
        hopper.conv_rows(rows, jnp.zeros((2, 1024), jnp.bfloat16), channels=2, group=2)
    with pytest.raises(ValueError, match="u: the kernels take n in 1024, 2048, 4096, got 1000"):
        hopper.conv_rows(rows[:, :1000], jnp.zeros((2, 1000), jnp.bfloat16), channels=2)


@pytest.mark.skipif(hopper.on_hopper(), reason="checks the path off Hopper")
def test_not_selected_off_hopper():
    u, k, _ = _inputs(1024, batch=1, channels=2, kernel_len=1024)
    jaxpr = str(jax.make_jaxpr(lambda u, k: long_conv(u, k, impl="auto"))(u, k))
    assert "fft" in jaxpr and "pallas_call" not in jaxpr


def test_auto_and_monarch_take_the_kernels_on_hopper(monkeypatch):
    """With on_hopper() true (here the interpreter stands in for the GPU), "auto" and "monarch" run the
    Hopper kernels where they apply, the gated block runs around them, and other problems keep their paths."""
    monkeypatch.setattr(hopper, "on_hopper", lambda: True)
    calls = []
    original = hopper.long_conv_monarch_hopper
    monkeypatch.setattr(hopper, "long_conv_monarch_hopper", lambda u, k: calls.append(u.shape) or original(u, k))
    u, k, _ = _inputs(600, batch=1, channels=2, kernel_len=600)
    want = _reference(u, k)
    for impl in ("auto", "monarch"):
        assert _rel_err(long_conv(u, k, impl=impl), want) < 1e-2
    gate, skip = u[..., ::-1], jnp.array([0.5, -1.0])
    gated = gated_long_conv(u, k, gate, skip, impl="monarch")
    gated_want = gate.astype(jnp.float32) * (want + skip * u.astype(jnp.float32))
    assert _rel_err(gated, gated_want) < 1e-2
    assert calls == [u.shape] * 3
    long_conv(u.astype(jnp.float32), k, impl="auto")  # float32: fft
    long_conv(u, k, impl="monarch", causal=False)     # circular: the portable kernel
    assert len(calls) == 3
