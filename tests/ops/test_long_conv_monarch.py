"""The Monarch long convolution (DFT as small matmuls): the XLA einsum path and the fused Pallas kernel
(interpret mode on CPU) against a float64 NumPy convolution, forward and gradients, f32 and bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.layers.long_conv import LongConv
from longseq.ops import long_conv, long_conv_direct
from longseq.ops.long_conv_monarch import (dft_butterflies, long_conv_monarch_xla, monarch_plan, real_signal_dft,
                                           split_factors)
from longseq.ops.long_conv_monarch_pallas import long_conv_monarch_pallas, make_plan, supports


def numpy_conv(u, k, *, causal):
    """float64: per batch and channel, np.convolve (causal: its first seq outputs; circular: wrapped)."""
    u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
    batch, seq, channels = u.shape
    y = np.zeros(u.shape)
    for b in range(batch):
        for c in range(channels):
            full = np.convolve(u[b, :, c], k[c])
            if causal:
                y[b, :, c] = full[:seq]
            else:
                wrapped = np.zeros(seq + len(full))
                wrapped[:len(full)] = full
                y[b, :, c] = wrapped[:seq] + wrapped[seq:2 * seq]
    return y


def random_inputs(seed, batch, seq, channels, kernel_len, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.standard_normal((batch, seq, channels)), dtype)
    k = jnp.asarray(rng.standard_normal((channels, kernel_len)) / np.sqrt(kernel_len), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, seq, channels)), jnp.float32)
    return u, k, dy


def relative_error(actual, expected):
    expected = np.asarray(expected, np.float64)
    return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / max(np.abs(expected).max(), 1e-30)


def test_plan_picks_factors_by_length():
    assert split_factors(512) == (32, 16)
    assert split_factors(1 << 14) == (128, 128)
    assert split_factors(1 << 15) == (32, 32, 32)
    assert split_factors(1 << 21) == (128, 128, 128)
    assert monarch_plan(1000, 1000, causal=True).length == 2048  # >= seq + kernel_len − 1, a power of two
    assert monarch_plan(1000, 10, causal=True).length == 1024
    circular = monarch_plan(256, 256, causal=False)
    assert (circular.length, circular.fold) == (256, False)  # a power of two: no padding
    folded = monarch_plan(300, 7, causal=False)
    assert (folded.length, folded.kernel_len, folded.out_len, folded.fold) == (1024, 300, 599, True)
    with pytest.raises(ValueError, match="length: expected a power of two, got 48"):
        split_factors(48)


CASES = [(1, 1, True), (7, 3, True), (7, 7, False), (31, 16, True), (100, 37, True), (100, 100, False),
         (64, 64, False), (300, 300, True), (2000, 700, True)]  # the last: a 3-factor-free 2-factor plan


@pytest.mark.parametrize("seq, kernel_len, causal", CASES)
def test_xla_monarch_matches_numpy_in_float32(seq, kernel_len, causal):
    u, k, _ = random_inputs(seq + kernel_len, 2, seq, 3, kernel_len)
    y = jax.jit(long_conv_monarch_xla, static_argnames="causal")(u, k, causal=causal)
    assert relative_error(y, numpy_conv(u, k, causal=causal)) < 2e-6


@pytest.mark.parametrize("kernel_len,length", [(7, 16), (1000, 2048), (2048, 2048)])
def test_real_signal_dft_is_the_full_fft_forward_and_transposed(kernel_len, length):
    """The kernels' spectrum by rfft and symmetry equals jnp.fft.fft of the real rows, and so does k's cotangent."""
    k = jax.random.normal(jax.random.key(0), (3, kernel_len), jnp.float32)
    re, im = jax.random.normal(jax.random.key(1), (2, 3, length), jnp.float32)
    full = lambda x: jnp.fft.fft(x.astype(jnp.float32), length, axis=-1)
    got, got_vjp = jax.vjp(lambda x: real_signal_dft(x, length), k)
    want, want_vjp = jax.vjp(full, k)
    assert got.shape == (3, 2, length) and got.dtype == jnp.float32
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got[:, 0] + 1j * got[:, 1], want, rtol=0, atol=2e-6 * scale)
    # JAX pairs a complex output's cotangent c with the planes' (Re c, −Im c)
    np.testing.assert_allclose(got_vjp(jnp.stack([re, -im], 1))[0], want_vjp(re + 1j * im)[0], rtol=1e-5, atol=1e-4)


def test_three_factor_plan_matches_fft():
    u, k, _ = random_inputs(1, 1, 9000, 2, 9000)  # L = 2^15 = 32·32·32
    assert len(monarch_plan(9000, 9000, causal=True).factors) == 3
    y = jax.jit(long_conv_monarch_xla, static_argnames="causal")(u, k, causal=True)
    assert relative_error(y, long_conv(u, k, impl="fft")) < 5e-6


def test_xla_monarch_gradients_and_bfloat16():
    u, k, dy = random_inputs(3, 2, 100, 4, 60)

    def grads(conv, causal):
        return jax.jit(lambda u, k, dy: jax.vjp(lambda u, k: conv(u, k, causal=causal), u, k)[1](dy))(u, k, dy)

    for causal in (True, False):
        for got, want in zip(grads(long_conv_monarch_xla, causal), grads(long_conv_direct, causal)):
            assert relative_error(got, want) < 2e-6
    y16 = long_conv_monarch_xla(u.astype(jnp.bfloat16), k, causal=True)
    assert y16.dtype == jnp.bfloat16
    assert 1e-4 < relative_error(y16, numpy_conv(u, k, causal=True)) < 3e-2  # bf16 matmul operands


PALLAS_CASES = [(256, 256, True, 3), (300, 100, True, 5), (300, 300, False, 2), (512, 512, True, 4)]


@pytest.mark.parametrize("seq, kernel_len, causal, channels", PALLAS_CASES)
def test_fused_kernel_forward_and_gradients(seq, kernel_len, causal, channels):
    """Interpret mode: the fused kernel's forward, its du (the kernel again, conjugate spectrum) and
    its dk (the batch-summed cross spectrum, back through the XLA transform of k)."""
    assert supports(seq, kernel_len, causal=causal)
    u, k, dy = random_inputs(seq + channels, 2, seq, channels, kernel_len)
    y, vjp = jax.vjp(jax.jit(lambda u, k: long_conv_monarch_pallas(u, k, causal=causal, interpret=True)), u, k)
    assert relative_error(y, numpy_conv(u, k, causal=causal)) < 2e-6
    _, vjp_ref = jax.vjp(lambda u, k: long_conv_direct(u, k, causal=causal), u, k)
    for got, want, name in zip(vjp(dy), vjp_ref(dy), ("du", "dk")):
        assert relative_error(got, want) < 2e-6, name


def test_fused_kernel_in_bfloat16_and_its_limits():
    u, k, _ = random_inputs(5, 2, 256, 4, 256, jnp.bfloat16)
    y = jax.jit(lambda u, k: long_conv_monarch_pallas(u, k, causal=True, interpret=True))(u, k)
    assert y.dtype == jnp.bfloat16
    assert relative_error(y, numpy_conv(u.astype(jnp.float32), k, causal=True)) < 3e-2
    assert not supports(100, 100, causal=True)  # L = 256: too small a factor for Triton's matmul tiles
    assert not supports(8192, 8192, causal=True)  # L = 2^14: the XLA path
    assert make_plan(1024, 1024, 768, causal=True).block_c == 4


def test_dispatch_and_bad_arguments():
    u, k, _ = random_inputs(7, 2, 40, 3, 40)
    want = numpy_conv(u, k, causal=True)
    for impl in ("monarch", "direct", "fft"):
        assert relative_error(long_conv(u, k, impl=impl), want) < 2e-6
    forward, inverse = dft_butterflies((8, 8))
    with pytest.raises(ValueError, match="butterflies: need impl 'monarch' or 'auto' and causal=True"):
        long_conv(u, k, impl="fft", butterflies=(forward, inverse))
    with pytest.raises(ValueError, match="butterflies: length 64 needs causal=True and >= seq"):
        long_conv(u, k, butterflies=(forward, inverse))


def test_learned_butterfly_starts_as_the_convolution_and_learns():
    """At its DFT initialisation the layer equals the FFT layer; its factors get gradients."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 40, 6)), jnp.float32)  # shorter than the kernel
    plain = LongConv(6, 100, rngs=nnx.Rngs(0))
    learned = LongConv(6, 100, learned_butterfly=True, rngs=nnx.Rngs(0))
    assert relative_error(nnx.jit(lambda m: m(x))(learned), nnx.jit(lambda m: m(x))(plain)) < 2e-6

    def loss(model):
        return jnp.sum(model(x) ** 2)

    grads = nnx.jit(nnx.grad(loss))(learned)
    factor_grads = jax.tree.leaves(grads["butterfly"])
    assert len(factor_grads) == 2 * (2 + 1)  # forward and inverse: 2 matrices, 1 twiddle (L = 256 = 16·16)
    assert all(float(jnp.abs(g).max()) > 0 for g in factor_grads)


def test_learned_butterfly_from_yaml_config_trains(tmp_path):
    """model.long_conv.learned_butterfly: the LM builds with factor parameters and its loss is finite."""
    from longseq.config import load_config
    from longseq.train import train
    from longseq.train.metrics import read_metrics

    config = load_config(None, ["model.mixer=gated_conv", "model.d_model=16", "model.num_layers=1",
                                "model.long_conv.learned_butterfly=true", "data.seq_len=32",
                                "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32", "data.batch_size=4",
                                "data.eval_batches=1", "train.steps=2", "train.log_every=1", "train.eval_every=2",
                                "train.checkpoint_every=2", "train.progress=false", "mesh.data=1",
                                f"train.run_dir={tmp_path}", "train.name=butterfly"])
    run_dir = train(config)["run_dir"]
    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_compiled_kernel_on_gpu(dtype, tolerance):
    """impl='monarch' on a GPU: the compiled fused kernel (seq 1024: L = 2048), forward and gradients."""
    assert supports(1024, 1024, causal=True)
    u, k, dy = random_inputs(9, 2, 1024, 64, 1024, dtype)
    y, vjp = jax.vjp(jax.jit(lambda u, k: long_conv(u, k, impl="monarch")), u, k)
    u32 = u.astype(jnp.float32)
    _, vjp_ref = jax.vjp(lambda u, k: long_conv(u, k, impl="fft"), u32, k)
    assert relative_error(y, long_conv(u32, k, impl="fft")) < tolerance
    for got, want in zip(vjp(dy.astype(dtype)), vjp_ref(dy)):
        assert relative_error(got, want) < tolerance
