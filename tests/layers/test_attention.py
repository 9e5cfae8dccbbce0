import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.layers import Attention

# Jit whole calls: op-by-op dispatch compiles every primitive separately (slow on CPU).
apply = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))

D, H, KV, HD = 32, 4, 2, 8


def _rope_numpy(x, theta):
    # x: [batch, seq, heads, head_dim]; independent re-derivation of the rotate-half layout.
    seq, head_dim = x.shape[1], x.shape[-1]
    half = head_dim // 2
    freq = theta ** (-np.arange(half) * 2.0 / head_dim)
    ang = np.arange(seq)[:, None] * freq[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference(layer, x, *, causal):
    """Multi-head attention with every K/V head repeated for its query group, in float64 numpy."""
    x = np.asarray(x, np.float64)
    b, l, _ = x.shape
    q = (x @ np.asarray(layer.q_proj.kernel[...], np.float64)).reshape(b, l, H, HD)
    k, v = np.split(x @ np.asarray(layer.kv_proj.kernel[...], np.float64), 2, -1)
    k, v = k.reshape(b, l, KV, HD), v.reshape(b, l, KV, HD)
    q, k = _rope_numpy(q, layer.rope_theta), _rope_numpy(k, layer.rope_theta)
    k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)  # head h reads kv head h // group
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD)
    if causal:
        s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, l, H * HD)
    return out @ np.asarray(layer.out_proj.kernel[...], np.float64)


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_repeated_kv_reference(causal):
    layer = Attention(D, H, KV, causal=causal, rope_theta=50.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, D))
    np.testing.assert_allclose(np.asarray(apply(layer, x)), _reference(layer, x, causal=causal), rtol=2e-4, atol=2e-4)


def test_gqa_equals_mha_layer_with_repeated_kv_weights():
    gqa = Attention(D, H, KV, causal=True, rngs=nnx.Rngs(0))
    mha = Attention(D, H, H, causal=True, rngs=nnx.Rngs(1))
    mha.q_proj.kernel[...] = gqa.q_proj.kernel[...]
    mha.out_proj.kernel[...] = gqa.out_proj.kernel[...]
    wk, wv = np.split(np.asarray(gqa.kv_proj.kernel[...]), 2, -1)
    rep = lambda w: np.repeat(w.reshape(D, KV, HD), H // KV, axis=1).reshape(D, H * HD)
    mha.kv_proj.kernel[...] = jnp.asarray(np.concatenate([rep(wk), rep(wv)], -1))
    x = jax.random.normal(jax.random.key(2), (2, 9, D))
    np.testing.assert_allclose(np.asarray(apply(gqa, x)), np.asarray(apply(mha, x)), rtol=1e-5, atol=1e-5)
    assert gqa.kv_proj.kernel.shape == (D, 2 * KV * HD)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
    layer = Attention(D, H, KV, causal=True, dtype=dtype, rngs=nnx.Rngs(0))
    y = apply(layer, jnp.ones((3, 5, D), dtype))
    assert y.shape == (3, 5, D) and y.dtype == dtype
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


def test_causal_and_bidirectional():
    x = jax.random.normal(jax.random.key(0), (1, 8, D))
    x2 = x.at[:, 5].add(1.0)
    causal = Attention(D, H, causal=True, rngs=nnx.Rngs(0))
    diff = np.abs(np.asarray(apply(causal, x2) - apply(causal, x))).max(-1)[0]
    assert np.all(diff[:5] == 0) and np.all(diff[5:] > 0)
    bidir = Attention(D, H, causal=False, rngs=nnx.Rngs(0))
    assert np.all(np.abs(np.asarray(apply(bidir, x2) - apply(bidir, x))).max(-1) > 0)


def test_segment_ids_isolate_packed_sequences():
    layer = Attention(D, H, KV, causal=False, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    x = jax.random.normal(jax.random.key(0), (1, 8, D))
    x2 = x.at[:, 4:].add(1.0)  # change segment 1 only
    y, y2 = apply(layer, x, segment_ids=(ids, ids)), apply(layer, x2, segment_ids=(ids, ids))
    np.testing.assert_array_equal(np.asarray(y[:, :3]), np.asarray(y2[:, :3]))
    assert np.abs(np.asarray(y[:, 3:] - y2[:, 3:])).min() >= 0 and np.abs(np.asarray(y[:, 3] - y2[:, 3])).max() > 0
    # without segment ids, the change leaks into segment 0
    assert np.abs(np.asarray(apply(layer, x)[:, :3] - apply(layer, x2)[:, :3])).max() > 0
