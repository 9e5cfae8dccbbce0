"""The Hopper flash-attention prototype (experiments/hopper_attention/flash_forward.py, flash_backward.py), run by
the Pallas GPU interpreter on CPU against longseq's reference attention, and lowered for CUDA."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from longseq.ops import attention

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments" / "hopper_attention"))
import flash_backward  # noqa: E402
import flash_forward  # noqa: E402


def _inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (batch, seq, h, head_dim), jnp.float32).astype(jnp.bfloat16)
                 for key, h in zip(keys, (heads, kv_heads, kv_heads)))


def test_forward_matches_the_reference():
    q, k, v = _inputs(1, 128, 2, 1, 64)  # GQA, one tile, 2 key blocks through a ring of 2 slots
    out, lse = flash_forward.flash_forward(q, k, v, block_kv=64, stages=2, interpret=flash_forward.interpret_params())
    want_out, want_lse = attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="reference")
    assert out.shape == q.shape and out.dtype == jnp.bfloat16 and lse.shape == (1, 2, 128)
    assert float(jnp.abs(out.astype(jnp.float32) - want_out).max()) < 2e-2
    assert float(jnp.abs(lse - want_lse).max()) < 1e-3


@pytest.mark.parametrize("causal, window, segmented, q_offset, kv_offset, head_dim", [
    (True, 70, False, 150, 100, 64),   # blocks skipped, masked, whole, masked, skipped; keys no query sees
    (False, 50, True, 30, 0, 64),      # a two-sided window over packed sequences: every seen block masked
    (True, None, False, 0, 0, 128),    # dQ's columns split between the warpgroups; one skips the diagonal block
])
def test_forward_and_gradients_match_the_reference(causal, window, segmented, q_offset, kv_offset, head_dim):
    """(out, lse) and the gradients of both (lse's cotangent too) against the reference, GQA, tails padded
    inside (130 queries and 190 keys: two tiles each way), traced global offsets."""
    q_len, kv_len = 130, 190
    segment_ids = (jnp.arange(q_len)[None] // 50, jnp.arange(kv_len)[None] // 70) if segmented else None
    q = _inputs(1, q_len, 2, 2, head_dim, seed=1)[0]
    _, k, v = _inputs(1, kv_len, 2, 1, head_dim, seed=2)
    do = _inputs(1, q_len, 2, 2, head_dim, seed=3)[0]
    dlse = jax.random.normal(jax.random.key(4), (1, 2, q_len), jnp.float32)
    offsets = jnp.int32(q_offset), jnp.int32(kv_offset)
    options = dict(causal=causal, window=window, segment_ids=segment_ids)

    def vjp(attend, *args):
        (out, lse), pullback = jax.vjp(lambda q, k, v: attend(q, k, v, *offsets), *args)
        return out, lse, pullback((do.astype(out.dtype), dlse))

    out, lse, grads = vjp(lambda q, k, v, a, b: flash_backward.flash_attention(
        q, k, v, q_offset=a, kv_offset=b, interpret=flash_backward.interpret_params(), **options), q, k, v)
    want, want_lse, want_grads = vjp(lambda q, k, v, a, b: attention(
        q, k, v, q_offset=a, kv_offset=b, impl="reference", **options), *(x.astype(jnp.float32) for x in (q, k, v)))
    assert float(jnp.abs(out.astype(jnp.float32) - want).max()) < 2e-2
    assert bool(jnp.all(jnp.isfinite(lse) == jnp.isfinite(want_lse)))
    assert float(jnp.abs(jnp.where(jnp.isfinite(want_lse), lse - want_lse, 0.0)).max()) < 1e-3
    for got, expected in zip(grads, want_grads):
        assert got.shape == expected.shape and got.dtype == jnp.bfloat16
        assert float(jnp.abs(got.astype(jnp.float32) - expected).max() / jnp.abs(expected).max()) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_for_cuda(causal):
    q = jax.ShapeDtypeStruct((2, 4096, 16, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 4096, 4, 128), jnp.bfloat16)
    forward = functools.partial(flash_forward.flash_forward, causal=causal)
    assert "mosaic_gpu" in jax.export.export(jax.jit(forward), platforms=["cuda"])(q, k, k).mlir_module()
    ids = (jnp.zeros((2, 4096), jnp.int32),) * 2 if causal else None  # segment ids and a window with causal
    window = 1024 if causal else None

    def loss(q, k, v):
        return jnp.sum(flash_backward.flash_attention(q, k, v, causal=causal, segment_ids=ids, window=window)[0])
    grad = jax.grad(loss, (0, 1, 2))
    assert jax.export.export(jax.jit(grad), platforms=["cuda"])(q, k, k).mlir_module().count("mosaic_gpu") >= 2


def test_bad_input_is_refused():
    q, k, v = _inputs(1, 128, 2, 1, 64)
    with pytest.raises(ValueError, match="kv_heads 3 must divide heads 2"):
        flash_forward.flash_forward(q, *_inputs(1, 128, 3, 3, 64)[1:])
    with pytest.raises(ValueError, match="bfloat16"):
        flash_forward.flash_forward(q.astype(jnp.float32), k, v)
    with pytest.raises(ValueError, match="block_kv: expected 64 or 128"):
        flash_forward.flash_forward(q, k, v, block_kv=96)
    with pytest.raises(ValueError, match="head_dim up to 128"):
        flash_backward.flash_attention(*_inputs(1, 128, 2, 1, 256))
