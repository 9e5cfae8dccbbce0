"""The three Monarch passes for long sequences (longseq.ops.long_conv_monarch_passes): in Pallas interpret mode on
CPU against jnp.fft, forward and gradients, paired and unpaired batches, two and three factors; the dispatch of
long_conv(impl="monarch"); and their lowering through Triton for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import long_conv, long_conv_monarch_passes as passes
from longseq.ops.long_conv import _monarch_path, _resolve_impl


def _rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def _inputs(batch, seq, channels, kernel_len, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(keys[0], (batch, seq, channels), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (channels, kernel_len), jnp.float32) / np.sqrt(kernel_len)
    dy = jax.random.normal(keys[2], (batch, seq, channels), jnp.float32).astype(jnp.bfloat16)
    return u, k, dy


def test_passes_factorisation_is_the_linear_convolution():
    # two factors; first factor 128 then two of 16, or 256 then one; 128 then two of 128, or 512, 32, 128
    for n, r1 in ((1024, None), (16384, 128), (16384, 256), (1 << 20, 128), (1 << 20, 512)):
        assert passes._numpy_model(n, r1) < 1e-12


def test_plan_widens_the_first_factor_where_it_was_measured_faster():
    assert [passes.plan(n).r1 for n in (8192, 16384, 32768, 1 << 18, 1 << 19, 1 << 20)] == [128, 256, 128, 128,
                                                                                                512, 512]
    assert passes.plan(16384) == passes.Plan(16384, 32768, 256, 128, 1)        # two factors, M = 128
    assert passes.plan(1 << 20) == passes.Plan(1 << 20, 1 << 21, 512, 32, 128)
    for n, r1 in ((16384, 64), (16384, 1024), (1024, 512)):  # 1024: L / 512 = 4, too few for a factor
        with pytest.raises(ValueError, match="r1=.*128, 256 or 512"):
            passes.plan(n, r1)


ON_GPU = jax.devices()[0].platform == "gpu"
on_gpu_only = pytest.mark.skipif(not ON_GPU, reason="long rows: compiled passes only (a GPU)")


# (batch, seq, channels, kernel_len): an even batch goes through in pairs, an odd one unpaired; seq 1000 pads to
# 1024 (two factors), 9001 to 16384 (first factor 256, two factors), 17000 to 32768 (three factors, the middle
# pass's [r2, G, r3] blocks). Interpreted on CPU, compiled on a GPU, which also runs 2^17 (three factors, the
# last of 128) and 2^20 (512, 32, 128).
@pytest.mark.parametrize("shape", [
    pytest.param((4, 1000, 3, 995), id="pairs_two_factors"),
    pytest.param((1, 9001, 2, 4000), id="unpaired_first_factor_256"),
    pytest.param((2, 17000, 1, 4000), id="pairs_three_factors"),
    pytest.param((2, 70001, 8, 65536), id="pairs_128k", marks=on_gpu_only),
    pytest.param((1, 1 << 20, 4, 1 << 20), id="unpaired_1m", marks=on_gpu_only),
])
def test_passes_match_fft(shape):
    batch, seq, channels, kernel_len = shape
    u, k, dy = _inputs(batch, seq, channels, kernel_len)

    def loss(conv):
        return lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    def conv(u, k):
        return passes.long_conv_monarch_passes(u, k, interpret=not ON_GPU)

    def reference(u, k):
        return long_conv(u.astype(jnp.float32), k, impl="fft")

    (y, vjp) = jax.vjp(conv, u, k)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert _rel_err(y, reference(u, k)) < 1e-2
    du, dk = vjp(dy)
    want_du, want_dk = jax.grad(loss(reference), (0, 1))(u, k)
    assert du.dtype == u.dtype and dk.dtype == k.dtype
    assert _rel_err(du, want_du) < 1e-2
    assert _rel_err(dk, want_dk) < 1e-2


def test_a_512_point_first_factor_matches_fft():
    """r1 = 512 (the plan's at 512K and 1M, which only a GPU runs) on a short row, interpreted: pass A makes four
    chunks of k1 rows, A' two chunks of outputs, each a sum over two chunks of k1; a pair, forward and gradients."""
    u, k, dy = _inputs(2, 8192, 1, 3000)
    rows, dy_rows = u.transpose(0, 2, 1).reshape(2, 8192), dy.transpose(0, 2, 1).reshape(2, 8192)

    def conv(rows, k):
        return passes.conv_rows(rows, passes.kernel_spectrum(k, passes.plan(8192, 512)), channels=1,
                                interpret=not ON_GPU, r1=512)

    def reference(rows, k):
        return long_conv(rows.astype(jnp.float32)[:, :, None], k, impl="fft")[:, :, 0]

    y, vjp = jax.vjp(conv, rows, k)
    assert _rel_err(y, reference(rows, k)) < 1e-2
    want = jax.grad(lambda r, k: jnp.sum(reference(r, k) * dy_rows.astype(jnp.float32)), (0, 1))(rows, k)
    for got, expected in zip(vjp(dy_rows), want):
        assert _rel_err(got, expected) < 1e-2


def test_pass_functions_compose_to_the_forward():
    """bench_passes.py times the passes one at a time: together they are the forward."""
    u, k, _ = _inputs(2, 1024, 2, 1000)
    rows = u.transpose(0, 2, 1).reshape(4, 1024)
    fns = passes.pass_functions(4, 1024, 2, interpret=True)
    khat = passes.kernel_spectrum(k, passes.plan(1024), jnp.bfloat16)
    y = fns["A'"](fns["C"](fns["A"](rows), khat))
    np.testing.assert_array_equal(y, passes.conv_rows(rows, passes.kernel_spectrum(k, passes.plan(1024)),
                                                      channels=2, interpret=True))


def test_traffic_counts_the_pairs_and_the_kernel_once_per_channel():
    n = 8192
    assert sum(passes.traffic(n, 8)["fwd"].values()) == 20 * n + 8 * n / 8
    assert sum(passes.traffic(n, 1)["fwd"].values()) == 36 * n + 8 * n


def _path(seq, dtype=jnp.bfloat16, causal=True, kernel_len=None):
    u = jax.ShapeDtypeStruct((1, seq, 4), dtype)
    k = jax.ShapeDtypeStruct((4, kernel_len or seq), jnp.float32)
    return _monarch_path(u, k, causal=causal)


def test_monarch_takes_the_passes_for_bf16_causal_past_4k():
    assert _path(4097) == _path(1 << 20) == "passes"
    from longseq.ops.long_conv_monarch_hopper import on_hopper

    assert _path(4096) == ("hopper" if on_hopper() else "portable")
    assert _path(6000, dtype=jnp.float32, kernel_len=2000) == "portable"  # the passes compute in bf16
    assert _path(8192, causal=False) == "portable"
    assert _path(16384, dtype=jnp.float32) == "xla"
    assert _path((1 << 20) + 1) == "xla"


def test_long_conv_runs_the_passes():
    u, k, _ = _inputs(2, 4100, 2, 300)
    y = long_conv(u, k, impl="monarch")
    np.testing.assert_array_equal(y, passes.long_conv_monarch_passes(u, k, interpret=not ON_GPU))


def test_auto_takes_the_passes_only_where_they_were_measured_faster():
    assert passes.faster_than_fft(2, 20000) and passes.faster_than_fft(4, 1 << 17)
    assert not passes.faster_than_fft(1, 1 << 16)        # unpaired
    assert passes.faster_than_fft(2, 1 << 14)            # 16K: with r1 = 256
    assert not passes.faster_than_fft(2, 8192)           # 8K: won at batch 8 only
    assert not passes.faster_than_fft(2, (1 << 17) + 1)  # 2^18: the middle pass is slower
    u, k = jax.ShapeDtypeStruct((2, 20000, 4), jnp.bfloat16), jax.ShapeDtypeStruct((4, 20000), jnp.float32)
    assert _resolve_impl("auto", u, k, causal=True) == ("monarch" if ON_GPU else "fft")


# forward: A, C, A'; the gradient: A on dy and u, C (du and K̂'s cotangent in one), A'
@pytest.mark.parametrize("shape", [(8, 8192, 768), (2, 16384, 256), (1, 65536, 768)])
def test_passes_lower_through_triton(shape):
    u = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = jax.ShapeDtypeStruct((shape[2], shape[1]), jnp.float32)
    conv = passes.long_conv_monarch_passes
    grad = jax.grad(lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32)), (0, 1))
    for fn, calls in ((conv, 3), (grad, 4)):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(u, k)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("n", [512, 3000, 1 << 21])
def test_passes_refuse_other_lengths(n):
    with pytest.raises(ValueError, match="powers of two from 1024 to 1048576"):
        passes.plan(n)
