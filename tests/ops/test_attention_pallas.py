"""The Pallas flash-attention kernels (impl="pallas") against the reference, on fresh random inputs.

On CPU the kernels run in Pallas interpret mode, which fills every output buffer with NaN before
the kernel runs (the test `test_interpret_mode_poisons_outputs` checks that premise), so "every
output is finite" catches tiles the kernels never write. The same file runs on the GPU (Triton).
Small tiles (16–32) make every case span several blocks in both directions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from longseq.config import ConfigError, FlashAttentionConfig
from longseq.ops import attention, merge_partials
from longseq.ops import attention_pallas

SMALL_TILES = FlashAttentionConfig(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                                   block_q_dq=32, block_k_dq=16)
ON_GPU = jax.default_backend() == "gpu"


def random_inputs(seed, *, batch=2, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments=0):
    """q, k, v in `dtype`, loss weights for out and lse (float32), and optional sorted segment ids."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((batch, heads, q_len)), jnp.float32)
    segment_ids = None
    if segments:
        segment_ids = tuple(jnp.asarray(np.sort(rng.integers(0, segments, (batch, n))), jnp.int32)
                            for n in (q_len, kv_len))
    return (q, k, v), (w_out, w_lse), segment_ids


def loss_and_outputs(q, k, v, w_out, w_lse, *, impl, **kwargs):
    """A scalar touching every output (finite lse only) and the outputs themselves."""
    out, lse = attention(q, k, v, impl=impl, **kwargs)
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term), (out, lse)


def outputs_and_grads(qkv, weights, *, impl, **kwargs):
    fn = jax.value_and_grad(loss_and_outputs, argnums=(0, 1, 2), has_aux=True)
    fn = jax.jit(fn, static_argnames=("impl", "causal", "window", "flash"))
    (_, (out, lse)), grads = fn(*qkv, *weights, impl=impl, **kwargs)
    return out, lse, grads


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


# (q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments, q_offset, kv_offset)
CASES = {
    "full": (64, 64, 2, 2, 32, False, None, 0, 0, 0),
    "causal_odd_gqa2": (77, 77, 4, 2, 16, True, None, 0, 0, 0),
    "causal_offsets_gqa4_cross": (70, 90, 4, 1, 24, True, None, 0, 37, 5),
    "causal_mqa8": (48, 48, 8, 1, 16, True, None, 0, 0, 0),
    "window_full_cross": (80, 50, 2, 2, 16, False, 13, 0, 0, 0),
    "window_causal_segments_offset": (50, 77, 2, 1, 16, True, 9, 3, 3, 0),
    "segments_odd": (33, 33, 2, 2, 16, False, None, 3, 0, 0),
    "empty_rows": (40, 40, 2, 2, 16, True, None, 0, 0, 20),
}


def run_case(name, dtype, seed):
    q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments, q_off, kv_off = CASES[name]
    qkv, weights, segment_ids = random_inputs(seed, q_len=q_len, kv_len=kv_len, heads=heads,
                                              kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                                              segments=segments)
    kwargs = dict(causal=causal, window=window, segment_ids=segment_ids, q_offset=q_off, kv_offset=kv_off)
    got = outputs_and_grads(qkv, weights, impl="pallas", flash=SMALL_TILES, **kwargs)
    # The reference sees the same (possibly bf16-rounded) inputs, computed in float32.
    qkv32 = tuple(x.astype(jnp.float32) for x in qkv)
    want = outputs_and_grads(qkv32, weights, impl="reference", **kwargs)
    return got, want


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name):
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = run_case(name, jnp.float32, seed=hash(name) % 1000)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert np.all(np.isfinite(out)), "unwritten or NaN output tile"
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))  # -inf exactly on empty rows
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.where(np.isfinite(lse_ref), lse, 0), np.where(np.isfinite(lse_ref), lse_ref, 0),
                               atol=2e-5, rtol=2e-5)
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        assert np.all(np.isfinite(grad)), f"d{arg}: unwritten or NaN tile"
        np.testing.assert_allclose(grad, grad_ref, atol=5e-5, rtol=5e-5, err_msg=f"d{arg}")


@pytest.mark.parametrize("name", ["causal_offsets_gqa4_cross", "window_causal_segments_offset", "full"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_matches_reference(name, dtype):
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = run_case(name, dtype, seed=7)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert relative_error(out, out_ref) < 1e-2
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, lse_ref, 0), atol=2e-2)
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        assert relative_error(grad, grad_ref) < 2e-2, f"d{arg}"


def test_empty_rows_have_zero_output_lse_minus_inf_and_zero_gradient():
    (out, lse, grads), _ = run_case("empty_rows", jnp.float32, seed=3)
    # kv_offset=20 with causal: queries 0..19 see no key at all.
    np.testing.assert_array_equal(out[:, :20], 0.0)
    assert np.all(lse[:, :, :20] == -np.inf) and np.all(np.isfinite(lse[:, :, 20:]))
    np.testing.assert_array_equal(grads[0][:, :20], 0.0)


def test_traced_offsets_and_default_tiles_under_jit():
    """Offsets computed inside jit (as inside shard_map) with the default (H100) tile sizes."""
    qkv, weights, _ = random_inputs(11, q_len=100, kv_len=60, heads=8, kv_heads=1, head_dim=64,
                                    dtype=jnp.float32)

    @jax.jit
    def run(q, k, v, shard):
        return attention(q, k, v, causal=True, window=70, q_offset=shard * 100, kv_offset=shard * 60 + 20,
                         impl="pallas")

    for shard in (0, 1):
        got = run(*qkv, jnp.int32(shard))
        want = attention(*qkv, causal=True, window=70, q_offset=shard * 100, kv_offset=shard * 60 + 20,
                         impl="reference")
        for x, ref in zip(got, want):
            finite = np.isfinite(ref)
            np.testing.assert_array_equal(np.isfinite(x), finite)
            np.testing.assert_allclose(np.where(finite, x, 0), np.where(finite, ref, 0), atol=2e-5, rtol=2e-5)


def test_two_half_kv_calls_merged_through_lse_equal_the_full_call():
    """The distributed building block: attention over two key halves, merged, gradients included
    (the merge differentiates through lse, so the kernel's lse cotangent path is exercised)."""
    qkv, (w_out, _), _ = random_inputs(5, q_len=48, kv_len=64, heads=4, kv_heads=2, head_dim=32,
                                       dtype=jnp.float32)
    kwargs = dict(causal=True, q_offset=40, impl="pallas", flash=SMALL_TILES)

    def merged(q, k, v):
        first = attention(q, k[:, :32], v[:, :32], kv_offset=0, **kwargs)
        second = attention(q, k[:, 32:], v[:, 32:], kv_offset=32, **kwargs)
        return merge_partials([first[0], second[0]], [first[1], second[1]])

    def full(q, k, v):
        return attention(q, k, v, kv_offset=0, **kwargs)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * w_out)

    for x, ref in zip(jax.jit(merged)(*qkv), jax.jit(full)(*qkv)):
        np.testing.assert_allclose(x, ref, atol=2e-5, rtol=2e-5)
    grads = jax.jit(jax.grad(loss(merged), argnums=(0, 1, 2)))(*qkv)
    grads_ref = jax.jit(jax.grad(loss(full), argnums=(0, 1, 2)))(*qkv)
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(grad, grad_ref, atol=5e-5, rtol=5e-5, err_msg=f"d{arg}")


@pytest.mark.skipif(ON_GPU, reason="interpret mode only")
def test_interpret_mode_poisons_outputs():
    """The premise of the finiteness checks above: an output tile nobody writes comes back NaN."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32),
                         interpret=True)(jnp.ones((8, 16), jnp.float32))
    assert np.all(np.isnan(out))


# ----------------------------------------------------------------------------------------------
# Block skipping: the ranges each program loops over, against brute force on positions


def brute_force_blocks(plan, starts, size, other_size, other_blocks, shift, rows_are_queries):
    """For each of `other_blocks` blocks: (any visible pair, all pairs visible)."""
    result = []
    for b in range(other_blocks):
        if rows_are_queries:
            q_idx = starts + np.arange(size)[:, None]
            k_idx = b * other_size + np.arange(other_size)[None, :]
        else:
            k_idx = starts + np.arange(size)[:, None]
            q_idx = b * other_size + np.arange(other_size)[None, :]
        visible = attention_pallas._visible(plan, jnp.asarray(q_idx), jnp.asarray(k_idx), shift, None, None)
        shape = np.broadcast_shapes(q_idx.shape, k_idx.shape)
        visible = np.broadcast_to(True if visible is None else np.asarray(visible), shape)
        result.append((visible.any(), visible.all()))
    return result


@pytest.mark.parametrize("causal,window", [(True, None), (False, 7), (True, 20), (False, None)])
@pytest.mark.parametrize("shift", [-45, -3, 0, 17, 60])
def test_block_ranges_skip_exactly_the_invisible_blocks(causal, window, shift):
    flash = FlashAttentionConfig(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                                 block_q_dq=16, block_k_dq=16)
    plan = attention_pallas.make_plan((1, 64, 1, 16), (1, 61, 1, 16), jnp.float32, causal=causal,
                                      window=window, segmented=False, scale=1.0, flash=flash, interpret=True)
    for rows_are_queries in (True, False):
        ranges_fn = attention_pallas._kv_block_ranges if rows_are_queries else attention_pallas._q_block_ranges
        n_rows = plan.q_pad if rows_are_queries else plan.kv_pad
        n_other = (plan.kv_pad if rows_are_queries else plan.q_pad) // 16
        for start in range(0, n_rows, 16):
            lo, full_lo, full_hi, hi = (int(x) for x in ranges_fn(plan, jnp.int32(start), 16, 16, jnp.int32(shift)))
            truth = brute_force_blocks(plan, start, 16, 16, n_other, shift, rows_are_queries)
            where = f"rows_are_queries={rows_are_queries} start={start}"
            for b, (any_visible, all_visible) in enumerate(truth):
                in_range = lo <= b < hi
                assert in_range or not any_visible, f"{where}: block {b} visible but skipped"
                if full_lo <= b < full_hi:
                    assert all_visible, f"{where}: block {b} run unmasked but partly hidden"
            visible_blocks = [b for b, (any_visible, _) in enumerate(truth) if any_visible]
            if visible_blocks:  # tight: no fully invisible block at either end of the range
                assert (lo, hi) == (visible_blocks[0], visible_blocks[-1] + 1), where
            else:
                assert lo == hi, where


def test_causal_skips_about_half_the_blocks():
    flash = dataclasses.replace(SMALL_TILES, block_q=16, block_k=16)
    plan = attention_pallas.make_plan((1, 256, 1, 16), (1, 256, 1, 16), jnp.float32, causal=True, window=None,
                                      segmented=False, scale=1.0, flash=flash, interpret=True)
    visited = sum(int(hi - lo) for lo, _, _, hi in
                  (attention_pallas._kv_block_ranges(plan, jnp.int32(s), 16, 16, jnp.int32(0))
                   for s in range(0, 256, 16)))
    assert visited == 16 * 17 // 2  # the lower triangle of a 16 × 16 grid of blocks, diagonal included


# ----------------------------------------------------------------------------------------------
# Plans and errors


def test_plan_shrinks_tiles_for_wide_rows_and_short_sequences():
    flash = FlashAttentionConfig()
    plan = attention_pallas.make_plan((1, 4096, 8, 128), (1, 4096, 8, 128), jnp.bfloat16, causal=True,
                                      window=None, segmented=False, scale=1.0, flash=flash, interpret=False)
    assert (plan.block_q, plan.block_k) == (flash.block_q, flash.block_k)
    wide = attention_pallas.make_plan((1, 4096, 8, 256), (1, 4096, 8, 256), jnp.float32, causal=True,
                                      window=None, segmented=False, scale=1.0, flash=flash, interpret=False)
    assert (wide.block_q, wide.block_k) == (flash.block_q // 4, flash.block_k // 4)
    short = attention_pallas.make_plan((1, 20, 8, 80), (1, 5, 8, 80), jnp.float32, causal=True,
                                       window=None, segmented=False, scale=1.0, flash=flash, interpret=False)
    assert (short.block_q, short.block_k, short.q_pad, short.kv_pad, short.head_dim_pad) == (32, 16, 32, 16, 128)


def test_flash_config_rejects_tiles_that_are_not_powers_of_two():
    with pytest.raises(ConfigError, match="block_k_dq: must be a power of two, got 48"):
        FlashAttentionConfig(block_k_dq=48)
    with pytest.raises(ConfigError, match="block_q: must be >= 16"):
        FlashAttentionConfig(block_q=8)


def test_bad_window_and_cudnn_limits_are_named():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="window: expected None or a positive int, got 0"):
        attention(q, q, q, window=0, impl="pallas")
    with pytest.raises(ValueError, match="segment_ids: impl='cudnn' does not take segment ids"):
        ids = jnp.zeros((1, 8), jnp.int32)
        attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                  segment_ids=(ids, ids), impl="cudnn")
    with pytest.raises(ValueError, match="q: impl='cudnn' takes bfloat16 or float16, got float32"):
        attention(q, q, q, causal=True, q_offset=8, impl="cudnn")
