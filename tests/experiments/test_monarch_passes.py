"""The portable pass prototype for long N (experiments/long_conv_kernel/monarch_passes.py), run in Pallas interpret
mode on CPU against jnp.fft, and lowered through Triton for CUDA."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments" / "long_conv_kernel"))
import monarch_passes  # noqa: E402

# The defaults (pairs, batch loop, K̂ and T2 in bf16, fused backward) at an even batch; and every other option's
# other value at an odd batch (which runs unpaired).
DEFAULTS = dict(batch=4, channels=3, options={})
OTHERS = dict(batch=3, channels=2, options=dict(
    batch_loop=False, khat_dtype=jnp.float32, table_dtype=jnp.float32, tile=32, rows_per_program=1, block=0,
    hoist=True, fuse_backward=False, num_warps=4, num_stages=1))


def _rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def _inputs(n, batch, channels, kernel_len, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(keys[0], (batch, channels, n), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (channels, kernel_len), jnp.float32) / np.sqrt(n)
    dy = jax.random.normal(keys[2], (batch, channels, n), jnp.float32).astype(jnp.bfloat16)
    return u, k, dy


def _reference(u, k):
    """The anchor's formula irfft(rfft(u, 2N) · rfft(k, 2N))[:N] in float32. u: [B, H, N], k: [H, kernel_len]."""
    n = u.shape[-1]
    spectrum = jnp.fft.rfft(u.astype(jnp.float32), 2 * n) * jnp.fft.rfft(k.astype(jnp.float32), 2 * n)
    return jnp.fft.irfft(spectrum, 2 * n)[..., :n]


def test_passes_factorisation_is_the_linear_convolution():
    for n in (1024, 16384, 1 << 20):  # two factors, three factors of 16, three of 128
        assert monarch_passes._numpy_model(n) < 1e-12


@pytest.mark.parametrize("config", [DEFAULTS, OTHERS], ids=["defaults", "others"])
@pytest.mark.parametrize("n", [1024, 16384])  # two factors, three factors
def test_passes_match_fft(n, config):
    u, k, dy = _inputs(n, batch=config["batch"], channels=config["channels"], kernel_len=n - 5)

    def loss(conv):
        return lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    conv = functools.partial(monarch_passes.long_conv_bhn, interpret=True, **config["options"])
    y = conv(u, k)
    assert y.shape == u.shape and y.dtype == u.dtype
    assert _rel_err(y, _reference(u, k)) < 1e-2
    du, dk = jax.grad(loss(conv), (0, 1))(u, k)
    want_du, want_dk = jax.grad(loss(_reference), (0, 1))(u.astype(jnp.float32), k)
    assert _rel_err(du, want_du) < 1e-2
    assert _rel_err(dk, want_dk) < 1e-2


def test_pass_functions_compose_to_the_forward():
    """The bench times the passes one at a time: together they are the forward."""
    u, k, _ = _inputs(1024, batch=2, channels=2, kernel_len=1000)
    fns = monarch_passes.pass_functions(4, 1024, 2, interpret=True)
    khat = monarch_passes.kernel_spectrum(k, monarch_passes.plan(1024), jnp.bfloat16)
    y = fns["A'"](fns["C"](fns["A"](u.reshape(4, 1024)), khat)).reshape(u.shape)
    np.testing.assert_array_equal(y, monarch_passes.long_conv_bhn(u, k, interpret=True))


def test_traffic_counts_the_pairs_and_the_kernel_once_per_channel():
    n = 8192
    forward = monarch_passes.traffic(n, 8)["fwd"]
    assert sum(forward.values()) == 20 * n + 8 * n / 8
    assert sum(monarch_passes.traffic(n, 1)["fwd"].values()) == 36 * n + 8 * n


# forward: A, C, A'; the gradient of sum(y) (the forward left out): A on dy and u, C (fused or two), A'
@pytest.mark.parametrize("config", [DEFAULTS, OTHERS], ids=["defaults", "others"])
@pytest.mark.parametrize("shape", [(8, 768, 4096), (4, 768, 65536)])
def test_passes_lower_through_triton(shape, config):
    u = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = jax.ShapeDtypeStruct(shape[1:], jnp.float32)
    conv = functools.partial(monarch_passes.long_conv_bhn, **config["options"])
    grad = jax.grad(lambda u, k: jnp.sum(conv(u, k).astype(jnp.float32)), (0, 1))
    fused = config["options"].get("fuse_backward", True)
    for fn, calls in ((conv, 3), (grad, 4 if fused else 5)):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(u, k)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("n", [512, 3000, 1 << 21])
def test_passes_refuse_other_lengths(n):
    with pytest.raises(ValueError, match="powers of two from 1024 to 1048576"):
        monarch_passes.plan(n)
