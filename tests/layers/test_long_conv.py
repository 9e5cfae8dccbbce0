import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.layers import (ConvKernel, GatedConv, LongConv, LongConvMixer, ShortConv, init_long_conv_kernel,
                            short_conv, smooth, squash)

# Jit whole calls: op-by-op dispatch compiles every primitive separately (slow on CPU).
apply = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))
effective_kernel = nnx.jit(lambda layer, seq=None: layer.effective_kernel(seq), static_argnums=1)
effective_kernels = nnx.jit(lambda layer, seq=None: layer.effective_kernels(seq), static_argnums=1)
rng = np.random.default_rng(0)


def _causal_conv_numpy(x, k):
    """y[b, t, c] = Σ_{s<=t} k[c, t-s] x[b, s, c], float64."""
    b, l, c = x.shape
    y = np.zeros((b, l, c))
    for t in range(l):
        for s in range(max(0, t - k.shape[1] + 1), t + 1):
            y[:, t] += k[:, t - s] * x[:, s]
    return y


def _bidirectional_conv_numpy(x, k_fwd, k_bwd):
    """y[b, t, c] = Σ_{s<=t} k_fwd[c, t-s] x[b, s, c] + Σ_{s>t} k_bwd[c, s-t-1] x[b, s, c], float64."""
    b, l, c = x.shape
    y = np.zeros((b, l, c))
    for t in range(l):
        for s in range(l):
            if s <= t and t - s < k_fwd.shape[1]:
                y[:, t] += k_fwd[:, t - s] * x[:, s]
            elif s > t and s - t - 1 < k_bwd.shape[1]:
                y[:, t] += k_bwd[:, s - t - 1] * x[:, s]
    return y


def test_squash_soft_thresholds():
    k = jnp.array([[-0.5, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3]])
    out = np.asarray(squash(k, 0.1))
    np.testing.assert_array_equal(out[0, 1:6], 0.0)  # |k| <= λ: exactly zero
    np.testing.assert_allclose(out[0, [0, 6]], [-0.4, 0.2], rtol=1e-6)
    assert squash(k, 0.0) is k


def test_effective_kernel_is_squashed():
    layer = LongConv(4, 32, squash_lambda=0.01, rngs=nnx.Rngs(0))
    raw = np.asarray(layer.kernel[...])
    assert np.mean(np.abs(raw) <= 0.01) > 0.2  # the test covers both sides of the threshold
    eff = np.asarray(effective_kernel(layer))
    np.testing.assert_array_equal(eff[np.abs(raw) <= 0.01], 0.0)
    big = np.abs(raw) > 0.01
    np.testing.assert_allclose(eff[big], raw[big] - 0.01 * np.sign(raw[big]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("width", [3, 4, 5])
def test_smooth_is_a_moving_average(width):
    k = rng.normal(size=(3, 20)).astype(np.float32)
    expected = np.stack([np.convolve(row, np.ones(width) / width, mode="same") for row in k])
    np.testing.assert_allclose(np.asarray(jax.jit(smooth, static_argnums=1)(jnp.asarray(k), width)), expected,
                               rtol=1e-5, atol=1e-6)
    assert smooth(jnp.asarray(k), 1) is not None and np.array_equal(np.asarray(smooth(jnp.asarray(k), 1)), k)


def test_effective_kernel_smooths_then_squashes_then_truncates():
    layer = LongConv(3, 24, squash_lambda=0.002, smooth_width=5, rngs=nnx.Rngs(1))
    raw = np.asarray(layer.kernel[...], np.float64)
    smoothed = np.stack([np.convolve(row, np.ones(5) / 5, mode="same") for row in raw])
    expected = np.sign(smoothed) * np.maximum(np.abs(smoothed) - 0.002, 0)
    np.testing.assert_allclose(np.asarray(effective_kernel(layer)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(effective_kernel(layer, 10)), expected[:, :10], rtol=1e-5, atol=1e-7)


def test_kernel_dropout_only_in_training():
    layer = LongConv(8, 64, kernel_dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    raw = np.asarray(layer.kernel[...])
    a, b = np.asarray(effective_kernel(layer)), np.asarray(effective_kernel(layer))
    assert 0.3 < np.mean(a == 0) < 0.7
    np.testing.assert_allclose(a[a != 0], 2 * raw[a != 0], rtol=1e-6)  # inverted dropout scaling
    assert not np.array_equal(a, b)  # the RNG stream advances between calls
    layer.eval()
    np.testing.assert_array_equal(np.asarray(effective_kernel(layer)), raw)
    layer.train()
    assert np.mean(np.asarray(effective_kernel(layer)) == 0) > 0.3
    bidir = LongConv(8, 64, causal=False, kernel_dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    fwd, bwd = (np.asarray(k) == 0 for k in effective_kernels(bidir))
    assert 0.3 < fwd.mean() < 0.7 and 0.3 < bwd.mean() < 0.7 and not np.array_equal(fwd, bwd)  # own masks


def test_long_conv_layer_matches_numpy():
    layer = LongConv(4, 16, causal=True, rngs=nnx.Rngs(0))
    assert not hasattr(layer, "kernel_bwd")  # causal: one kernel
    layer.skip[...] = jnp.array([0.5, 1.0, -1.0, 2.0])
    for seq in (16, 9):  # full length, and a shorter input using the first `seq` taps
        x = rng.normal(size=(2, seq, 4)).astype(np.float32)
        k = np.asarray(layer.kernel[...], np.float64)[:, :seq]
        expected = _causal_conv_numpy(x, k) + np.array([0.5, 1.0, -1.0, 2.0]) * x
        np.testing.assert_allclose(np.asarray(apply(layer, jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)


def test_bidirectional_long_conv_matches_the_two_kernel_formula():
    """y[t] = Σ_{s<=t} k_fwd[t-s] x[s] + Σ_{s>t} k_bwd[s-t-1] x[s] + D x[t], random kernels (not the
    decaying init, so every tap matters), against a float64 loop."""
    r = np.random.default_rng(11)
    layer = LongConv(3, 12, causal=False, rngs=nnx.Rngs(0))
    k_fwd, k_bwd, d = r.normal(size=(3, 12)), r.normal(size=(3, 12)), r.normal(size=3)
    layer.kernel[...], layer.kernel_bwd[...], layer.skip[...] = (jnp.asarray(a, jnp.float32) for a in (k_fwd, k_bwd, d))
    for seq in (12, 7):  # full length, and a shorter input using the first `seq` taps of each kernel
        x = r.normal(size=(2, seq, 3))
        expected = _bidirectional_conv_numpy(x, k_fwd[:, :seq], k_bwd[:, :seq]) + d * x
        np.testing.assert_allclose(np.asarray(apply(layer, jnp.asarray(x, jnp.float32))), expected,
                                   rtol=1e-4, atol=1e-4)


def test_bidirectional_long_conv_sees_the_future_with_its_own_kernel():
    layer = LongConv(4, 16, causal=False, rngs=nnx.Rngs(0))
    x = rng.normal(size=(1, 16, 4)).astype(np.float32)
    t = 9
    x2 = x.copy()
    x2[:, t] += 1.0
    diff = np.asarray(apply(layer, x2) - apply(layer, x))[0]  # [seq, channels]
    k_fwd, k_bwd = (np.asarray(k, np.float64) for k in effective_kernels(layer))
    # the perturbation reaches every earlier position, through the backward kernel: distance d, tap d-1
    np.testing.assert_allclose(diff[:t], k_bwd[:, :t][:, ::-1].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(diff[t:], k_fwd[:, :16 - t].T + np.eye(16 - t, 1), rtol=1e-4, atol=1e-6)
    # the nearest future neighbour has an initial weight like the nearest past one (not a far tail)
    assert np.abs(diff[t - 1]).mean() > 0.3 * np.abs(diff[t + 1]).mean()
    assert np.abs(k_bwd - k_fwd).max() > 1e-3  # two independent kernels
    # no backward kernel, no future: the layer is causal
    layer.kernel_bwd[...] = jnp.zeros((4, 16))
    assert np.abs(np.asarray(apply(layer, x2) - apply(layer, x))[0, :t]).max() < 1e-6


def test_bidirectional_long_conv_ignores_trailing_zeros():
    layer = LongConv(4, 24, causal=False, rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 10, 4)).astype(np.float32)
    y = np.asarray(apply(layer, x))
    for length in (11, 16, 24):
        padded = np.pad(x, ((0, 0), (0, length - 10), (0, 0)))
        np.testing.assert_allclose(np.asarray(apply(layer, padded))[:, :10], y, rtol=1e-5, atol=1e-6)


def test_effective_kernels_regularise_each_kernel():
    causal = LongConv(3, 16, squash_lambda=0.002, smooth_width=3, rngs=nnx.Rngs(0))
    (k,) = effective_kernels(causal, 10)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(effective_kernel(causal, 10)))
    bidir = LongConv(3, 16, causal=False, squash_lambda=0.002, smooth_width=3, rngs=nnx.Rngs(0))
    kernels = effective_kernels(bidir, 10)
    assert len(kernels) == 2
    for eff, param in zip(kernels, (bidir.kernel, bidir.kernel_bwd)):
        expected = np.asarray(squash(smooth(param[...], 3), 0.002))[:, :10]
        assert eff.shape == (3, 10)
        np.testing.assert_allclose(np.asarray(eff), expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="effective_kernels"):
        bidir.effective_kernel()


def test_conv_kernel_variable_type_and_init():
    layer = LongConv(16, 256, rngs=nnx.Rngs(0))
    assert isinstance(layer.kernel, ConvKernel) and isinstance(layer.kernel, nnx.Param)
    kernels = jax.tree.leaves(nnx.state(layer, ConvKernel))
    assert len(kernels) == 1 and kernels[0].shape == (16, 256) and kernels[0].dtype == jnp.float32
    assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 2  # kernel + skip
    bidir = LongConv(16, 256, causal=False, rngs=nnx.Rngs(0))
    assert isinstance(bidir.kernel_bwd, ConvKernel)
    assert [k.shape for k in jax.tree.leaves(nnx.state(bidir, ConvKernel))] == [(16, 256)] * 2
    assert len(jax.tree.leaves(nnx.state(bidir, nnx.Param))) == 3  # kernel + kernel_bwd + skip
    k = np.asarray(init_long_conv_kernel(jax.random.key(0), 16, 256))
    assert 0.005 < np.std(k[:, :16]) < 0.05  # small
    # decaying along the taps, faster for later channels
    assert np.abs(k[:, -64:]).mean() < 0.5 * np.abs(k[:, :64]).mean()
    assert np.abs(k[-4:, 128:]).mean() < 0.5 * np.abs(k[:4, 128:]).mean()


def test_short_conv_causal_and_centred():
    x = rng.normal(size=(2, 7, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (2, 2), (0, 0)))
    causal = sum(w[j] * xp[:, j:j + 7] for j in range(3))             # taps t-2, t-1, t
    centred = sum(w[j] * xp[:, j + 1:j + 8] for j in range(3))        # taps t-1, t, t+1
    f = jax.jit(short_conv, static_argnames="causal")
    np.testing.assert_allclose(np.asarray(f(x, w, causal=True)), causal, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(x, w, causal=False)), centred, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_gated_conv_has_no_bias_zero_rows_stay_zero(causal):
    """Zero input gives exactly zero output (no bias anywhere, as H3's shift SSM has none), so the
    zeroed padding rows of the residual stream add nothing inside the layer."""
    layer = GatedConv(8, 16, causal=causal, rngs=nnx.Rngs(0))
    assert [p.shape for p in jax.tree.leaves(nnx.state(layer.short_conv, nnx.Param))] == [(3, 24)]
    assert np.array_equal(np.asarray(apply(layer, jnp.zeros((1, 16, 8)))), np.zeros((1, 16, 8)))
    # real rows then zeros: the first 10 outputs do not depend on how many zero rows follow (>= 1)
    x = rng.normal(size=(1, 10, 8)).astype(np.float32)
    outs = [np.asarray(apply(layer, np.pad(x, ((0, 0), (0, n), (0, 0)))))[:, :10] for n in (1, 6)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_gated_conv_formula():
    layer = GatedConv(8, 12, causal=True, short_conv_width=3, rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 12, 8)).astype(np.float32)
    z = x @ np.asarray(layer.in_proj.kernel[...], np.float64)
    zp = np.pad(z, ((0, 0), (2, 0), (0, 0)))
    w = np.asarray(layer.short_conv.weight[...], np.float64)
    z = sum(w[j] * zp[:, j:j + 12] for j in range(3))
    q, k, v = np.split(z, 3, -1)
    kern = np.asarray(layer.long_conv.kernel[...], np.float64)
    inner = _causal_conv_numpy(k * v, kern) + k * v  # skip D = 1 at init
    expected = (q * inner) @ np.asarray(layer.out_proj.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(apply(layer, jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)
    assert isinstance(layer.long_conv.kernel, ConvKernel)


def test_gated_conv_runs_the_fused_gated_kernel_with_monarch():
    """impl="monarch" at a length the fused kernel takes: the gate and D go into the kernel
    (ops.gated_long_conv); output and parameter gradients equal the FFT path's."""
    from longseq.ops.long_conv_monarch_pallas import gating_fuses

    assert gating_fuses(256, 256, 8, causal=True)
    layers = [GatedConv(8, 256, causal=True, impl=impl, rngs=nnx.Rngs(3)) for impl in ("monarch", "fft")]
    x = jnp.asarray(rng.normal(size=(2, 256, 8)), jnp.float32)

    def loss_and_grads(layer):
        graphdef, params = nnx.split(layer)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(params)

    (fused_loss, fused_grads), (plain_loss, plain_grads) = map(loss_and_grads, layers)
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))  # float32 rounding of different sums


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_layers_shapes_and_dtypes(dtype):
    x = jnp.asarray(rng.normal(size=(2, 10, 8)), dtype)
    cfg = dict(squash_lambda=1e-3, smooth_width=3, kernel_dropout=0.1, dtype=dtype, rngs=nnx.Rngs(0))
    for layer in (LongConv(8, 16, **cfg), LongConvMixer(8, 16, causal=True, **cfg),
                  GatedConv(8, 16, causal=False, **cfg), ShortConv(8, 4, causal=True, dtype=dtype, rngs=nnx.Rngs(0))):
        y = apply(layer, x)
        assert y.shape == (2, 10, 8) and y.dtype == dtype, type(layer)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


@pytest.mark.parametrize("layer_cls", [LongConvMixer, GatedConv])
def test_conv_mixers_causal_or_not(layer_cls):
    x = rng.normal(size=(1, 12, 8)).astype(np.float32)
    x2 = x.copy()
    x2[:, 6] += 1.0
    causal = layer_cls(8, 12, causal=True, rngs=nnx.Rngs(0))
    y = np.asarray(apply(causal, x))
    diff = np.abs(np.asarray(apply(causal, x2)) - y).max(-1)[0]
    # FFT convolution leaves round-off (~1e-7 relative to the outputs) where the exact answer is 0
    assert np.all(diff[:6] < 1e-6 * max(np.abs(y).max(), 1.0)) and diff[6] > 1e-3
    bidir = layer_cls(8, 12, causal=False, rngs=nnx.Rngs(0))
    diff = np.abs(np.asarray(apply(bidir, x2) - apply(bidir, x))).max(-1)[0]
    assert np.all(diff[:6] > 1e-3)  # earlier positions see position 6 (backward kernel / centred)


@pytest.mark.parametrize("causal", [True, False])
def test_regularised_kernel_is_differentiable(causal):
    """Gradients flow through smooth, squash and kernel dropout to the raw kernels (finite, non-zero)."""
    layer = LongConv(4, 32, causal=causal, squash_lambda=1e-3, smooth_width=3, kernel_dropout=0.1,
                     rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 4)), jnp.float32)

    def loss(model):
        return jnp.sum(model(x) ** 2)

    grads = nnx.jit(nnx.grad(loss))(layer)  # under jit, as the trainer differentiates
    for name in ("kernel",) if causal else ("kernel", "kernel_bwd"):
        kernel_grad = np.asarray(getattr(grads, name)[...])
        assert np.all(np.isfinite(kernel_grad)) and np.abs(kernel_grad).max() > 0, name


@pytest.mark.parametrize("causal", [True, False])
def test_a_short_kernel_is_a_long_one_that_is_zero_past_its_taps(causal):
    """model.long_conv.kernel_len: a layer with K-tap kernels equals one with seq-tap kernels whose taps
    past K are zero, on a sequence longer than K."""
    seq, taps, channels = 40, 8, 3
    short = LongConv(channels, taps, causal=causal, rngs=nnx.Rngs(0))
    long = LongConv(channels, seq, causal=causal, rngs=nnx.Rngs(1))
    long.kernel[...] = jnp.zeros((channels, seq)).at[:, :taps].set(short.kernel[...])
    if not causal:
        long.kernel_bwd[...] = jnp.zeros((channels, seq)).at[:, :taps].set(short.kernel_bwd[...])
    x = jax.random.normal(jax.random.key(2), (2, seq, channels))
    np.testing.assert_allclose(short(x), long(x), rtol=1e-5, atol=1e-6)
    assert short.kernel[...].shape == (channels, taps)


def test_kernel_len_sets_the_kernel_parameters_and_is_checked():
    from longseq.config import ConfigError, load_config
    from longseq.data import make_task
    from longseq.train.trainer import Steps

    def conv_params(*overrides):
        config = load_config(None, ["model.mixer=gated_conv", "model.d_model=32", "data.seq_len=256", *overrides])
        return sum(x.size for x in jax.tree.leaves(Steps(config, make_task(config.data)).abstract_state["params"]["kernel"]))

    assert conv_params() == 2 * 32 * 256  # two layers of [d_model, seq_len] kernels
    assert conv_params("model.long_conv.kernel_len=64") == 2 * 32 * 64
    with pytest.raises(ConfigError, match=r"model\.long_conv\.kernel_len: 512 is longer than data\.seq_len=256"):
        load_config(None, ["model.mixer=long_conv", "data.seq_len=256", "model.long_conv.kernel_len=512"])
    with pytest.raises(ConfigError, match=r"model\.long_conv\.kernel_len: the learned butterfly"):
        load_config(None, ["model.mixer=long_conv", "model.long_conv.kernel_len=64",
                           "model.long_conv.learned_butterfly=true"])
