"""longseq.ops.attention and merge_partials against independent float64 NumPy / dense jnp versions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.ops import ATTENTION_IMPLS, attention, merge_partials

# ----------------------------------------------------------------------------------------------
# Independent implementations (no code from longseq)


def numpy_attention(q, k, v, *, causal=False, segment_ids=None, scale=None, q_offset=0, kv_offset=0):
    """Row-by-row float64 softmax over the visible keys, with explicit loops. Empty rows: 0, -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros(q.shape)
    lse = np.full((batch, heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(heads):
            kh = h // group
            for i in range(q_len):
                cols = [j for j in range(kv_len)
                        if (not causal or kv_offset + j <= q_offset + i)
                        and (segment_ids is None or segment_ids[0][b, i] == segment_ids[1][b, j])]
                if not cols:
                    continue
                s = scale * (k[b, cols, kh] @ q[b, i, h])
                top = s.max()
                e = np.exp(s - top)
                lse[b, h, i] = top + np.log(e.sum())
                out[b, i, h] = (e / e.sum()) @ v[b, cols, kh]
    return out, lse


def dense_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0, kv_offset=0):
    """Plain jnp float32 masked softmax with K/V repeated per query head. Every row must see a key."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision="highest") / np.sqrt(q.shape[-1])
    mask = jnp.ones(s.shape[-2:], bool)[None, None]
    if causal:
        i = q_offset + jnp.arange(q.shape[1])
        j = kv_offset + jnp.arange(k.shape[1])
        mask = mask & (j[None, :] <= i[:, None])
    if segment_ids is not None:
        mask = mask & (segment_ids[0][:, None, :, None] == segment_ids[1][:, None, None, :])
    s = jnp.where(mask, s, -1e30)
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(s, axis=-1), v, precision="highest")
    return out, jax.nn.logsumexp(s, axis=-1)


def random_qkv(rng, batch=2, q_len=8, kv_len=8, heads=4, kv_heads=4, head_dim=16, dtype=np.float32):
    q = rng.standard_normal((batch, q_len, heads, head_dim))
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def loss_weights(rng, out_shape, lse_shape):
    return (jnp.asarray(rng.standard_normal(out_shape), jnp.float32),
            jnp.asarray(rng.standard_normal(lse_shape), jnp.float32))


def scalar_loss(out, lse, w_out, w_lse):
    """A loss touching every output; -inf lse (empty rows) is left out, as any real loss must."""
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term)


# The tests run compiled: one XLA compilation per test is much faster on CPU than eager op-by-op
# dispatch. test_impl_auto_is_the_reference_off_gpu and the invalid-input tests cover the eager path.
attention_jit = jax.jit(attention, static_argnames=("causal", "scale", "impl"))


def grad3(fn, argnums=(0, 1, 2)):
    return jax.jit(jax.grad(fn, argnums=argnums))


def outputs_and_grads(fn, w_out, w_lse):
    """Compiled (q, k, v) -> ((out, lse), (dq, dk, dv)) for fn(q, k, v) -> (out, lse) and scalar_loss."""
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return scalar_loss(out, lse, w_out, w_lse), (out, lse)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(q, k, v):
        (_, outputs), grads = value_and_grad(q, k, v)
        return outputs, grads

    return run


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Forward against NumPy


@pytest.mark.parametrize(
    "causal, heads, kv_heads, q_len, kv_len, seed",
    [
        (False, 4, 4, 8, 8, 1),
        (True, 4, 4, 8, 8, 2),
        (False, 4, 2, 7, 13, 3),
        (True, 4, 2, 7, 13, 4),
        (True, 4, 1, 13, 7, 5),
        (False, 4, 1, 1, 5, 6),
    ],
)
def test_forward_matches_numpy(causal, heads, kv_heads, q_len, kv_len, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads)
    out, lse = attention_jit(q, k, v, causal=causal)
    want_out, want_lse = numpy_attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, heads, q_len) and lse.dtype == jnp.float32
    # causal with q_len > kv_len and no offsets: every query still sees key 0.
    assert np.isfinite(want_lse).all()
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)


def test_custom_scale_matches_numpy():
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, q_len=5, kv_len=9, kv_heads=2)
    out, lse = attention_jit(q, k, v, causal=True, scale=0.37)
    want_out, want_lse = numpy_attention(q, k, v, causal=True, scale=0.37)
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids_match_numpy(causal):
    rng = np.random.default_rng(21 + causal)
    q, k, v = random_qkv(rng, q_len=11, kv_len=11, kv_heads=2)
    # Two packed sequences per row, split at a different point in each batch row.
    ids = jnp.asarray([[0] * 4 + [1] * 7, [0] * 8 + [1] * 3], jnp.int32)
    out, lse = attention_jit(q, k, v, causal=causal, segment_ids=(ids, ids))
    want_out, want_lse = numpy_attention(q, k, v, causal=causal, segment_ids=(ids, ids))
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)


@pytest.mark.parametrize("kv_offset", [0, 4, 16])
def test_offsets_match_numpy(kv_offset):
    """A query shard at global position 8 against key shards before, overlapping and after it."""
    rng = np.random.default_rng(31 + kv_offset)
    q, k, v = random_qkv(rng, q_len=8, kv_len=8, kv_heads=1)
    out, lse = attention_jit(q, k, v, causal=True, q_offset=8, kv_offset=kv_offset)
    want_out, want_lse = numpy_attention(q, k, v, causal=True, q_offset=8, kv_offset=kv_offset)
    if kv_offset == 16:  # every key is in the future of every query
        assert np.isneginf(want_lse).all()
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)


def test_traced_offsets_under_jit():
    """Offsets arrive as traced int32 scalars inside shard_map; one compiled function serves all."""
    rng = np.random.default_rng(41)
    q, k, v = random_qkv(rng, q_len=8, kv_len=8, kv_heads=2)
    fn = jax.jit(lambda q, k, v, qo, ko: attention(q, k, v, causal=True, q_offset=qo, kv_offset=ko))
    for q_offset, kv_offset in [(8, 0), (8, 16), (8, 5), (0, 0)]:
        out, lse = fn(q, k, v, jnp.int32(q_offset), jnp.int32(kv_offset))
        want_out, want_lse = numpy_attention(q, k, v, causal=True, q_offset=q_offset,
                                             kv_offset=kv_offset)
        assert_close(out, want_out, 1e-5)
        assert_close(lse, want_lse, 1e-5)


def test_bfloat16_matches_numpy_loosely():
    rng = np.random.default_rng(51)
    q, k, v = random_qkv(rng, q_len=7, kv_len=13, kv_heads=2, dtype=jnp.bfloat16)
    ids = jnp.asarray([[0] * 3 + [1] * 4, [0] * 7], jnp.int32)
    kv_ids = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13], jnp.int32)
    out, lse = attention_jit(q, k, v, causal=True, segment_ids=(ids, kv_ids), kv_offset=-6)
    # NumPy sees exactly the bf16-rounded inputs, so only the op's own rounding is measured.
    want_out, want_lse = numpy_attention(q, k, v, causal=True, segment_ids=(ids, kv_ids),
                                         kv_offset=-6)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(out, want_out, 2e-2)
    assert_close(lse, want_lse, 2e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="auto is the Pallas kernel on GPUs")
def test_impl_auto_is_the_reference_off_gpu():
    rng = np.random.default_rng(61)
    q, k, v = random_qkv(rng, q_len=6, kv_len=10, kv_heads=2)
    auto = attention(q, k, v, causal=True, impl="auto")
    ref = attention(q, k, v, causal=True, impl="reference")
    assert set(ATTENTION_IMPLS) == {"auto", "pallas", "pallas_mosaic_gpu", "reference", "xla", "cudnn"}
    for a, r in zip(auto, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


# ----------------------------------------------------------------------------------------------
# Rows with no visible key


def test_fully_masked_rows_give_zero_out_and_neg_inf_lse_and_zero_grads():
    rng = np.random.default_rng(71)
    q, k, v = random_qkv(rng, q_len=6, kv_len=9, kv_heads=2)
    # Queries with id 7 have no key with that id: 3 empty rows in batch row 0, 1 in row 1.
    q_ids = jnp.asarray([[0, 7, 0, 7, 1, 7], [1, 1, 1, 1, 1, 7]], jnp.int32)
    kv_ids = jnp.asarray([[0] * 4 + [1] * 5, [1] * 9], jnp.int32)
    empty = np.asarray(q_ids == 7)  # [batch, q_len]
    seg = (q_ids, kv_ids)

    w_out, w_lse = loss_weights(rng, q.shape, (2, 4, 6))
    run = outputs_and_grads(
        lambda q, k, v: attention(q, k, v, causal=True, segment_ids=seg, q_offset=4), w_out, w_lse)
    (out, lse), (dq, dk, dv) = run(q, k, v)

    want_out, want_lse = numpy_attention(q, k, v, causal=True, segment_ids=seg, q_offset=4)
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)
    assert np.all(np.asarray(out)[empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[empty]))
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(dq)[empty] == 0)

    # The empty rows must contribute nothing to dk, dv: compare with the same loss over the
    # non-empty rows only, computed by the independent dense version (every row sees a key).
    def loss_without_empty_rows(q, k, v):
        out, lse = dense_attention(q, k, v, causal=True, segment_ids=seg, q_offset=4)
        keep = jnp.asarray(~empty)
        return (jnp.sum(jnp.where(keep[:, :, None, None], out * w_out, 0.0))
                + jnp.sum(jnp.where(keep[:, None, :], lse * w_lse, 0.0)))

    want = grad3(loss_without_empty_rows, argnums=(0, 1, 2))(q, k, v)
    for got, exp in zip((dq, dk, dv), want):
        assert_close(got, exp, 1e-4)


def test_all_rows_masked_gives_zero_grads():
    rng = np.random.default_rng(81)
    q, k, v = random_qkv(rng, q_len=4, kv_len=5, kv_heads=1)
    w_out, w_lse = loss_weights(rng, q.shape, (2, 4, 4))

    def loss(q, k, v):
        return scalar_loss(*attention(q, k, v, causal=True, q_offset=0, kv_offset=10), w_out, w_lse)

    for g in grad3(loss, argnums=(0, 1, 2))(q, k, v):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "causal, kv_heads, q_len, kv_len, packed, seed",
    [
        (False, 4, 7, 13, False, 91),
        (True, 2, 8, 8, False, 92),
        (True, 1, 13, 7, True, 93),
    ],
)
def test_grads_match_dense_jnp(causal, kv_heads, q_len, kv_len, packed, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, q_len=q_len, kv_len=kv_len, kv_heads=kv_heads)
    seg = None
    if packed:  # both sequences start at position 0, so with causal every query sees a key
        seg = (jnp.asarray([[0] * 5 + [1] * (q_len - 5)] * 2, jnp.int32),
               jnp.asarray([[0] * 5 + [1] * (kv_len - 5)] * 2, jnp.int32))
    w_out, w_lse = loss_weights(rng, q.shape, (2, 4, q_len))

    def ours(q, k, v):
        return scalar_loss(*attention(q, k, v, causal=causal, segment_ids=seg), w_out, w_lse)

    def dense(q, k, v):
        return scalar_loss(*dense_attention(q, k, v, causal=causal, segment_ids=seg), w_out, w_lse)

    got = grad3(ours, argnums=(0, 1, 2))(q, k, v)
    want = grad3(dense, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-4)


def test_grads_match_finite_differences_in_float64():
    if not hasattr(jax, "enable_x64"):
        pytest.skip("this jax has no jax.enable_x64 context manager")
    with jax.enable_x64(True):
        rng = np.random.default_rng(101)
        q, k, v = random_qkv(rng, batch=1, q_len=5, kv_len=6, heads=2, kv_heads=1, head_dim=4,
                             dtype=np.float64)
        ids = (jnp.asarray([[0, 0, 1, 1, 1]]), jnp.asarray([[0, 0, 0, 1, 1, 1]]))
        w_out = jnp.asarray(rng.standard_normal(q.shape))
        w_lse = jnp.asarray(rng.standard_normal((1, 2, 5)))

        @jax.jit
        def loss(q, k, v):
            out, lse = attention(q, k, v, causal=True, segment_ids=ids, kv_offset=-1)
            assert out.dtype == jnp.float64  # otherwise finite differences would be meaningless
            return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

        grads = grad3(loss, argnums=(0, 1, 2))(q, k, v)
        directions = [jnp.asarray(rng.standard_normal(x.shape)) for x in (q, k, v)]
        eps = 1e-6
        plus = loss(*(x + eps * d for x, d in zip((q, k, v), directions)))
        minus = loss(*(x - eps * d for x, d in zip((q, k, v), directions)))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.sum(g * d) for g, d in zip(grads, directions))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# merge_partials


@pytest.mark.parametrize(
    "bounds, seed",
    [
        ((0, 11, 24), 111),  # 2 blocks of odd sizes
        ((0, 8, 16, 24), 112),  # 3 blocks; the last (keys 16..23) is in the future of every query
    ],
)
def test_merge_partials_equals_whole(bounds, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, q_len=8, kv_len=24, kv_heads=2)
    q_offset = 8  # the queries are positions 8..15
    w_out, w_lse = loss_weights(rng, q.shape, (2, 4, 8))

    def merged(q, k, v):
        parts = [attention(q, k[:, a:b], v[:, a:b], causal=True, q_offset=q_offset, kv_offset=a)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        return merge_partials([o for o, _ in parts], [s for _, s in parts])

    def whole(q, k, v):
        return attention(q, k, v, causal=True, q_offset=q_offset)

    (out, lse), got = outputs_and_grads(merged, w_out, w_lse)(q, k, v)
    want_out, want_lse = numpy_attention(q, k, v, causal=True, q_offset=q_offset)
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)

    want = grad3(lambda *a: scalar_loss(*whole(*a), w_out, w_lse), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        assert_close(g, w, 1e-5)


def test_merge_partials_accepts_stacked_arrays():
    rng = np.random.default_rng(121)
    q, k, v = random_qkv(rng, q_len=5, kv_len=10, kv_heads=1)
    parts = [attention_jit(q, k[:, a:a + 5], v[:, a:a + 5]) for a in (0, 5)]
    out, lse = merge_partials(jnp.stack([o for o, _ in parts]), jnp.stack([s for _, s in parts]))
    want_out, want_lse = numpy_attention(q, k, v)
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)


def test_merge_partials_rows_empty_in_every_part():
    rng = np.random.default_rng(131)
    q, k, v = random_qkv(rng, q_len=6, kv_len=8, kv_heads=2)
    q_ids = jnp.asarray([[0, 9, 1, 9, 0, 1]] * 2, jnp.int32)  # id 9 appears in no key block
    kv_ids = jnp.asarray([[0, 1] * 4] * 2, jnp.int32)
    empty = np.asarray(q_ids == 9)
    w_out, w_lse = loss_weights(rng, q.shape, (2, 4, 6))

    def merged(q, k, v):
        parts = [attention(q, k[:, a:a + 4], v[:, a:a + 4], causal=True, q_offset=2, kv_offset=a,
                           segment_ids=(q_ids, kv_ids[:, a:a + 4])) for a in (0, 4)]
        return merge_partials([o for o, _ in parts], [s for _, s in parts])

    (out, lse), (dq, dk, dv) = outputs_and_grads(merged, w_out, w_lse)(q, k, v)
    want_out, want_lse = numpy_attention(q, k, v, causal=True, q_offset=2,
                                         segment_ids=(q_ids, kv_ids))
    assert_close(out, want_out, 1e-5)
    assert_close(lse, want_lse, 1e-5)
    assert np.all(np.asarray(out)[empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[empty]))

    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(dq)[empty] == 0)


def test_merge_partials_direct_inputs_with_all_parts_neg_inf():
    """Gradients w.r.t. merge_partials' own inputs stay finite when a row is -inf in every part."""
    rng = np.random.default_rng(141)
    outs = jnp.asarray(rng.standard_normal((3, 1, 2, 2, 4)), jnp.float32)
    lses = jnp.asarray(rng.standard_normal((3, 1, 2, 2)), jnp.float32)
    lses = lses.at[:, 0, :, 1].set(-jnp.inf)  # query 1: empty in all parts
    lses = lses.at[1, 0, :, 0].set(-jnp.inf)  # query 0: empty in part 1 only
    out, lse = jax.jit(merge_partials)(outs, lses)

    w = np.exp(np.asarray(lses[:, 0, :, 0], np.float64))  # [parts, heads] for query 0
    want_lse0 = np.log(w.sum(0))
    want_out0 = np.einsum("ph,phd->hd", w / w.sum(0), np.asarray(outs[:, 0, 0], np.float64))
    assert_close(lse[0, :, 0], want_lse0, 1e-6)
    assert_close(out[0, 0], want_out0, 1e-6)
    assert np.all(np.asarray(out[0, 1]) == 0) and np.all(np.isneginf(np.asarray(lse[0, :, 1])))

    w_out, w_lse = loss_weights(rng, out.shape, lse.shape)
    d_outs, d_lses = grad3(lambda o, s: scalar_loss(*merge_partials(o, s), w_out, w_lse),
                              argnums=(0, 1))(outs, lses)
    assert np.isfinite(np.asarray(d_outs)).all() and np.isfinite(np.asarray(d_lses)).all()
    np.testing.assert_array_equal(np.asarray(d_outs[:, 0, 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(d_lses[:, 0, :, 1]), 0.0)


# ----------------------------------------------------------------------------------------------
# Invalid inputs


def _bad_call(case):
    q = jnp.zeros((2, 5, 4, 8))
    k = jnp.zeros((2, 6, 2, 8))
    ids_q, ids_k = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 6), jnp.int32)
    calls = {
        "q_rank": lambda: attention(q[0], k, k),
        "k_rank": lambda: attention(q, k[0], k[0]),
        "batch": lambda: attention(q, k[:1], k[:1]),
        "head_dim": lambda: attention(q, k[..., :4], k[..., :4]),
        "kv_heads": lambda: attention(q, jnp.zeros((2, 6, 3, 8)), jnp.zeros((2, 6, 3, 8))),
        "v_shape": lambda: attention(q, k, k[:, :5]),
        "dtype": lambda: attention(q, k.astype(jnp.bfloat16), k.astype(jnp.bfloat16)),
        "int_q": lambda: attention(q.astype(jnp.int32), k, k),
        "segment_pair": lambda: attention(q, k, k, segment_ids=ids_q),
        "segment_q_shape": lambda: attention(q, k, k, segment_ids=(ids_k, ids_k)),
        "segment_kv_shape": lambda: attention(q, k, k, segment_ids=(ids_q, ids_q)),
        "segment_dtype": lambda: attention(q, k, k, segment_ids=(ids_q * 1.0, ids_k)),
        "q_offset": lambda: attention(q, k, k, causal=True, q_offset=1.5),
        "kv_offset": lambda: attention(q, k, k, causal=True, kv_offset=jnp.zeros(3, jnp.int32)),
        "impl": lambda: attention(q, k, k, impl="foo"),
        "merge_lses": lambda: merge_partials([q, q], [jnp.zeros((2, 4, 5))]),
        "merge_outs": lambda: merge_partials([q[0]], [jnp.zeros((2, 4, 5))]),
    }
    return calls[case]


@pytest.mark.parametrize(
    "case, match",
    [
        ("q_rank", r"^q: expected rank 4"),
        ("k_rank", r"^k: expected rank 4"),
        ("batch", r"^k: expected batch 2"),
        ("head_dim", r"^k: expected head_dim 8"),
        ("kv_heads", r"^k: expected kv_heads dividing heads=4"),
        ("v_shape", r"^v: expected the shape of k"),
        ("dtype", r"^k, v: expected the dtype of q"),
        ("int_q", r"^q: expected a floating dtype"),
        ("segment_pair", r"^segment_ids: expected None or a pair"),
        ("segment_q_shape", r"^segment_ids: expected q_ids of shape \(2, 5\)"),
        ("segment_kv_shape", r"^segment_ids: expected kv_ids of shape \(2, 6\)"),
        ("segment_dtype", r"^segment_ids: expected integer q_ids"),
        ("q_offset", r"^q_offset: expected an integer scalar"),
        ("kv_offset", r"^kv_offset: expected an integer scalar"),
        ("impl", r"^impl: expected one of 'auto', 'pallas', 'pallas_mosaic_gpu', 'reference', 'xla', 'cudnn', "
                 r"got 'foo'$"),
        ("merge_lses", r"^lses: expected stacked shape"),
        ("merge_outs", r"^outs: expected"),
    ],
)
def test_invalid_inputs_raise(case, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(case)()


# ----------------------------------------------------------------------------------------------
# attention_backward: the backward pass from saved (or merged) statistics

SMALL_TILES = dict(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)


@pytest.mark.parametrize("impl,causal,window,packed", [("reference", False, None, False), ("reference", True, 9, True),
                                                       ("pallas", True, None, True), ("pallas", True, 9, False),
                                                       ("pallas", False, 7, True)])
def test_attention_backward_gives_each_key_blocks_share(impl, causal, window, packed):
    """Split the keys in two blocks (one with no visible key for the first rows when causal) and
    merge: attention_backward of each block, from the merged out and lse, sums to autodiff of the
    merged attention. With a block's own statistics it is the vjp of that block."""
    from longseq.config import FlashAttentionConfig
    from longseq.ops import attention_backward

    rng = np.random.default_rng(11 + causal)
    q = jnp.asarray(rng.standard_normal((2, 21, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 29, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 29, 2, 8)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (2, 50))), jnp.int32) if packed else None
    split = 13
    blocks = [dict(kv_offset=0, cols=slice(0, split)), dict(kv_offset=split, cols=slice(split, 29))]
    flash = FlashAttentionConfig(**SMALL_TILES)

    def block(q, k, v, b):
        segment_ids = None if ids is None else (ids[:, 29:], ids[:, :29][:, b["cols"]])
        return dict(causal=causal, window=window, q_offset=8, kv_offset=b["kv_offset"], segment_ids=segment_ids)

    def merged(q, k, v):
        parts = [attention(q, k[:, b["cols"]], v[:, b["cols"]], impl="reference", **block(q, k, v, b))
                 for b in blocks]
        return merge_partials([p[0] for p in parts], [p[1] for p in parts])

    out, lse = merged(q, k, v)
    _, vjp = jax.vjp(lambda q, k, v: merged(q, k, v)[0], q, k, v)
    dq_want, dk_want, dv_want = vjp(dout)
    shares = [attention_backward(q, k[:, b["cols"]], v[:, b["cols"]], out, lse, dout, impl=impl, flash=flash,
                                 **block(q, k, v, b)) for b in blocks]
    np.testing.assert_allclose(shares[0][0] + shares[1][0], dq_want, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([s[1] for s in shares], 1), dk_want, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([s[2] for s in shares], 1), dv_want, atol=2e-5)

    own = block(q, k, v, blocks[1])
    out1, lse1 = attention(q, k[:, split:], v[:, split:], impl="reference", **own)
    _, vjp1 = jax.vjp(lambda q, k, v: attention(q, k, v, impl="reference", **own)[0], q, k[:, split:], v[:, split:])
    got = attention_backward(q, k[:, split:], v[:, split:], out1, lse1, dout, impl=impl, flash=flash, **own)
    for g, w in zip(got, vjp1(dout)):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_attention_backward_refuses_what_it_cannot_run():
    from longseq.ops import attention_backward

    q = jnp.ones((1, 4, 2, 8))
    lse = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="impl: attention_backward runs 'pallas', 'pallas_mosaic_gpu', 'cudnn' or "
                                         "'reference'"):
        attention_backward(q, q, q, q, lse, q, impl="xla")
    with pytest.raises(ValueError, match=r"lse: expected shape \(1, 2, 4\)"):
        attention_backward(q, q, q, q, lse[:, :, :3], q)
