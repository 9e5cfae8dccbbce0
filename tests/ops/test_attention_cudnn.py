"""The cuDNN block path (longseq.ops.attention_cudnn) on CPU, with cuDNN's two calls replaced by the
dense reference (the `fake_cudnn` fixture): which kernel each block kind runs, the lax.switch on
traced offsets, the custom_vjp, and the errors. `longseq check` on a GPU compares the real cuDNN
with the reference."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import attention, attention_backward
from longseq.ops.attention_cudnn import DIAGONAL, FULL, HIDDEN, PARTIAL, block_kind

attention_module = importlib.import_module("longseq.ops.attention")  # the module, not the function

# (q_len, kv_len, q_offset, kv_offset, causal, window) -> kind
KINDS = [
    ((8, 8, 0, 0, False, None), FULL),
    ((8, 8, 16, 0, True, None), FULL),
    ((8, 8, 16, 16, True, None), DIAGONAL),
    ((8, 8, 16, 16, True, 4), DIAGONAL),
    ((8, 8, 0, 8, True, None), HIDDEN),
    ((8, 16, 8, 0, True, None), PARTIAL),  # a query block against a longer prefix of keys
    ((8, 8, 4, 0, True, None), PARTIAL),  # misaligned blocks
    ((8, 8, 16, 0, True, 4), PARTIAL),  # a window across blocks
    ((8, 8, 0, 0, False, 4), PARTIAL),  # cuDNN's window is causal only
]


@pytest.mark.parametrize("args,kind", KINDS)
def test_block_kind_static_and_traced(args, kind):
    q_len, kv_len, q_offset, kv_offset, causal, window = args
    assert block_kind(q_len, kv_len, q_offset, kv_offset, causal=causal, window=window) == kind
    traced = jax.jit(lambda a, b: block_kind(q_len, kv_len, a, b, causal=causal, window=window))
    assert int(traced(jnp.int32(q_offset), jnp.int32(kv_offset))) == kind


def inputs(seed, q_len=16, kv_len=16, heads=4, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, q_len, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, kv_len, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, kv_len, kv_heads, head_dim)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return q, k, v, weights


# (q_len, kv_len, q_offset, kv_offset, window): FULL, DIAGONAL (windowed), HIDDEN, PARTIAL
BLOCKS = [(16, 16, 32, 0, None), (16, 16, 16, 16, 5), (16, 16, 0, 16, None), (16, 32, 16, 0, None)]


@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("block", BLOCKS, ids=["full", "diagonal", "hidden", "partial"])
def test_matches_reference_forward_and_gradients(block, traced, fake_cudnn):
    q_len, kv_len, q_offset, kv_offset, window = block
    q, k, v, weights = inputs(q_len + kv_len + q_offset, q_len, kv_len)

    def run(impl, offsets):
        def fn(q, k, v, q_offset, kv_offset):
            out, lse = attention(q, k, v, causal=True, q_offset=q_offset, kv_offset=kv_offset, window=window,
                                 impl=impl)
            return jnp.sum(out * weights), (out, lse)

        grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2), has_aux=True)) if traced else jax.grad(
            fn, argnums=(0, 1, 2), has_aux=True)
        return grad(q, k, v, *offsets)

    offsets = (jnp.int32(q_offset), jnp.int32(kv_offset)) if traced else (q_offset, kv_offset)
    grads, (out, lse) = run("cudnn", offsets)
    grads_ref, (out_ref, lse_ref) = run("reference", (q_offset, kv_offset))
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(grad, grad_ref, atol=5e-5)
    # Statically known kinds call cuDNN only where it can mask: never for HIDDEN or PARTIAL blocks.
    if not traced:
        expected = {0: [("forward", False), ("backward", False)], 1: [("forward", True), ("backward", True)]}
        assert fake_cudnn == expected.get(BLOCKS.index(block), [])


def test_backward_from_merged_statistics(fake_cudnn):
    """Two key blocks' shares, from the statistics merged over both, sum to the whole gradient."""
    q, k, v, weights = inputs(3, 16, 32)
    out, lse = attention(q, k, v, causal=True, q_offset=16, impl="reference")
    _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True, q_offset=16, impl="reference")[0], q, k, v)
    dq, dk, dv = vjp(weights)
    first = attention_backward(q, k[:, :16], v[:, :16], out, lse, weights, causal=True, q_offset=16, impl="cudnn")
    second = attention_backward(q, k[:, 16:], v[:, 16:], out, lse, weights, causal=True, q_offset=16,
                                kv_offset=16, impl="cudnn")
    np.testing.assert_allclose(first[0] + second[0], dq, atol=5e-5)
    np.testing.assert_allclose(jnp.concatenate([first[1], second[1]], axis=1), dk, atol=5e-5)
    np.testing.assert_allclose(jnp.concatenate([first[2], second[2]], axis=1), dv, atol=5e-5)
    assert fake_cudnn == [("backward", False), ("backward", True)]  # FULL, then DIAGONAL


def test_differentiating_through_the_lse_is_refused(fake_cudnn):
    q, k, v, _ = inputs(4)
    with pytest.raises(ValueError, match="lse: impl='cudnn' gives the log-sum-exp no gradient"):
        jax.grad(lambda q: jnp.sum(attention(q, k, v, impl="cudnn")[1]))(q)


def test_auto_picks_cudnn_on_gpus_where_it_applies(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    resolve = attention_module._resolve_impl
    bf16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    ids = (jnp.zeros((1, 8), jnp.int32),) * 2
    assert resolve("auto", bf16, None) == "cudnn"
    assert resolve("auto", bf16, ids) == "pallas"
    assert resolve("auto", bf16.astype(jnp.float32), None) == "pallas"
    assert resolve("auto", jnp.zeros((1, 8, 2, 12), jnp.bfloat16), None) == "pallas"  # head_dim 12
    assert resolve("auto", jnp.zeros((1, 8, 2, 256), jnp.bfloat16), None) == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve("auto", bf16, None) == "reference"


def test_limits_are_named():
    q = jnp.ones((1, 8, 2, 12), jnp.bfloat16)
    with pytest.raises(ValueError, match="q: impl='cudnn' takes head_dim a multiple of 8 and at most 128, got 12"):
        attention(q, q, q, impl="cudnn")
    with pytest.raises(ValueError, match="q: impl='cudnn' takes bfloat16 or float16, got float32"):
        attention_backward(*(q.astype(jnp.float32),) * 3, q.astype(jnp.float32), jnp.zeros((1, 2, 8)),
                           q.astype(jnp.float32), impl="cudnn")


def relative_error(x, reference):
    x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
    return np.max(np.abs(x - reference)) / max(np.max(np.abs(reference)), 1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="real cuDNN needs a GPU")
@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("block", BLOCKS, ids=["full", "diagonal", "hidden", "partial"])
def test_real_cudnn_matches_reference_in_bfloat16(block, traced):
    """The real cuDNN kernels (forward with float32 lse, backward from statistics) on 128-row blocks."""
    q_len, kv_len, q_offset, kv_offset, window = (8 * x if x else x for x in block)
    q, k, v, weights = (x.astype(jnp.bfloat16) for x in inputs(5, q_len, kv_len, head_dim=64))

    def run(impl, offsets):
        def fn(q, k, v, q_offset, kv_offset):
            out, lse = attention(q, k, v, causal=True, q_offset=q_offset, kv_offset=kv_offset, window=window,
                                 impl=impl)
            return jnp.sum(out.astype(jnp.float32) * weights), (out, lse)

        return jax.jit(jax.grad(fn, argnums=(0, 1, 2), has_aux=True))(q, k, v, *offsets)

    offsets = (jnp.int32(q_offset), jnp.int32(kv_offset)) if traced else (q_offset, kv_offset)
    grads, (out, lse) = run("cudnn", offsets)
    grads_ref, (out_ref, lse_ref) = run("reference", offsets)
    assert relative_error(out, out_ref) < 2e-2
    finite = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], atol=2e-2)
    for grad, grad_ref in zip(grads, grads_ref):
        assert relative_error(grad, grad_ref) < 3e-2
