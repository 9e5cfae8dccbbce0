"""The Mosaic TPU flash-attention kernels (attention_pallas_tpu) without a TPU.

Two checks stand in for one: the kernels run in Pallas interpret mode on CPU and must match the
reference (forward out and lse, gradients of q, k, v), and they must lower to Mosaic for platform
"tpu" (`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`), which needs a TPU description
for the CPU device (the `tpu_lowering` fixture). Lowering covers the Pallas → Mosaic MLIR step;
Mosaic's own compiler passes run inside libtpu and are not exercised here.

Sequence tiles on TPU are at least 128, so the cases use lengths of 130–330 to span several blocks
with ragged tails; head_dim is padded to 128 whatever it is.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from longseq.config import FlashAttentionConfig
from longseq.ops import attention, attention_pallas, attention_pallas_tpu

MIXED_TILES = FlashAttentionConfig(block_q=256, block_k=128, block_q_dkv=128, block_k_dkv=256,
                                   block_q_dq=256, block_k_dq=128)
KERNEL_NAMES = ("longseq_flash_tpu_forward", "longseq_flash_tpu_backward_dkdv", "longseq_flash_tpu_backward_dq")


@pytest.fixture
def tpu_lowering():
    """Lets `get_tpu_info` describe the default device (CPU here) as a TPU v5e, for lowering only."""
    from jax._src.pallas.mosaic import tpu_info

    if jax.default_backend() not in ("cpu", "tpu"):
        pytest.skip("lowering for TPU is checked from the CPU backend (or on a TPU)")
    kind = jax.devices()[0].device_kind  # "cpu" on CPU
    if tpu_info.chip_version_from_device_kind(kind) is not None:
        yield  # a real TPU describes itself
        return
    saved = dict(tpu_info.registry)
    tpu_info.registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    tpu_info.get_tpu_info.cache_clear()
    try:
        yield
    finally:
        tpu_info.registry.clear()
        tpu_info.registry.update(saved)
        tpu_info.get_tpu_info.cache_clear()


def flash_tpu(q, k, v, *, interpret, flash=FlashAttentionConfig(), causal=False, window=None, segment_ids=None,
              q_offset=0, kv_offset=0):
    """The public Pallas entry point, sent to the TPU kernels whatever the platform."""
    return attention_pallas.flash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, scale=1.0 / np.sqrt(q.shape[-1]), q_offset=q_offset,
        kv_offset=kv_offset, window=window, flash=flash, interpret=interpret, backend="tpu")


def random_inputs(seed, *, batch=2, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments=0):
    """q, k, v in `dtype`, loss weights for out and lse (float32), and optional sorted segment ids."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    weights = (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
               jnp.asarray(rng.standard_normal((batch, heads, q_len)), jnp.float32))
    segment_ids = None
    if segments:
        segment_ids = tuple(jnp.asarray(np.sort(rng.integers(0, segments, (batch, n))), jnp.int32)
                            for n in (q_len, kv_len))
    return (q, k, v), weights, segment_ids


def outputs_and_grads(fn, qkv, weights, q_offset, kv_offset, **kwargs):
    """(out, lse, (dq, dk, dv)) of a loss touching out and every finite lse; offsets traced under jit."""

    def loss(q, k, v, w_out, w_lse, q_offset, kv_offset):
        out, lse = fn(q, k, v, q_offset=q_offset, kv_offset=kv_offset, **kwargs)
        lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term), (out, lse)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (out, lse)), grads = grad_fn(*qkv, *weights, jnp.int32(q_offset), jnp.int32(kv_offset))
    return out, lse, grads


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


# (q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments, q_offset, kv_offset, flash)
CASES = {
    "full_cross": (200, 300, 2, 2, 64, False, None, 0, 0, 0, FlashAttentionConfig()),
    "causal_gqa2": (256, 256, 4, 2, 32, True, None, 0, 0, 0, FlashAttentionConfig()),
    "causal_offsets_mqa_mixed_tiles": (150, 290, 4, 1, 40, True, None, 0, 137, 5, MIXED_TILES),
    "window_full_cross": (300, 200, 2, 2, 16, False, 70, 0, 0, 0, FlashAttentionConfig()),
    "window_causal_segments_offset": (200, 330, 2, 1, 24, True, 90, 3, 130, 0, FlashAttentionConfig()),
    "segments_odd": (140, 140, 2, 2, 16, False, None, 3, 0, 0, FlashAttentionConfig()),
    "empty_rows": (260, 260, 2, 2, 16, True, None, 0, 0, 130, FlashAttentionConfig()),
}


def run_case(name, dtype, seed):
    q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments, q_off, kv_off, flash = CASES[name]
    qkv, weights, segment_ids = random_inputs(seed, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                              head_dim=head_dim, dtype=dtype, segments=segments)
    kwargs = dict(causal=causal, window=window, segment_ids=segment_ids)
    got = outputs_and_grads(lambda *a, **kw: flash_tpu(*a, interpret=True, flash=flash, **kw),
                            qkv, weights, q_off, kv_off, **kwargs)
    # The reference sees the same (possibly bf16-rounded) inputs, computed in float32.
    qkv32 = tuple(x.astype(jnp.float32) for x in qkv)
    want = outputs_and_grads(lambda *a, **kw: attention(*a, impl="reference", **kw),
                             qkv32, weights, q_off, kv_off, **kwargs)
    return got, want


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference_in_interpret_mode(name):
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = run_case(name, jnp.float32, seed=len(name))
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert np.all(np.isfinite(out)), "unwritten or NaN output tile"
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)  # -inf exactly on rows that see nothing
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, lse_ref, 0), atol=2e-5, rtol=2e-5)
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        assert np.all(np.isfinite(grad)), f"d{arg}: unwritten or NaN tile"
        np.testing.assert_allclose(grad, grad_ref, atol=5e-5, rtol=5e-5, err_msg=f"d{arg}")


@pytest.mark.parametrize("name", ["causal_offsets_mqa_mixed_tiles", "window_causal_segments_offset", "full_cross"])
def test_bfloat16_matches_reference_in_interpret_mode(name):
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = run_case(name, jnp.bfloat16, seed=7)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert relative_error(out, out_ref) < 1e-2
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, lse_ref, 0), atol=2e-2)
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        assert relative_error(grad, grad_ref) < 2e-2, f"d{arg}"


def test_empty_rows_have_zero_output_lse_minus_inf_and_zero_gradient():
    (out, lse, grads), _ = run_case("empty_rows", jnp.float32, seed=3)
    # kv_offset=130 with causal: queries 0..129 see no key; the first query block sees none at all.
    np.testing.assert_array_equal(out[:, :130], 0.0)
    assert np.all(lse[:, :, :130] == -np.inf) and np.all(np.isfinite(lse[:, :, 130:]))
    np.testing.assert_array_equal(grads[0][:, :130], 0.0)


# ----------------------------------------------------------------------------------------------
# Block skipping: work and DMA per block row, from the same table and index-map clamp the kernels use


def visited_and_fetched(table, num_rows, num_steps):
    """Steps that compute, and blocks the pipeline copies in (a copy whenever the block index changes)."""
    visited = fetched = 0
    for row in range(num_rows):
        lo, hi = int(table[4 * row]), int(table[4 * row + 3])
        visited += hi - lo
        blocks = [int(attention_pallas_tpu._clamp(step, table, row)) for step in range(num_steps)]
        fetched += 1 + sum(a != b for a, b in zip(blocks, blocks[1:]))
    return visited, fetched


@pytest.mark.parametrize("causal", [False, True])
def test_causal_computes_and_copies_about_half_the_blocks(causal):
    plan = attention_pallas_tpu.make_tpu_plan((1, 1024, 1, 128), (1, 1024, 1, 128), causal=causal, window=None,
                                              segmented=False, scale=1.0, flash=FlashAttentionConfig(),
                                              interpret=True)
    assert plan.block_q == plan.block_k == plan.block_q_dkv == plan.block_k_dkv == 128
    expected = 8 * 9 // 2 if causal else 8 * 8  # the lower triangle of 8 × 8 blocks, diagonal included
    for ranges_fn in (attention_pallas._kv_block_ranges, attention_pallas._q_block_ranges):
        table = np.asarray(attention_pallas_tpu._range_table(ranges_fn, plan, 128, 128, 8, jnp.int32(0)))
        assert visited_and_fetched(table, 8, 8) == (expected, expected)


def test_plan_tiles_are_lane_aligned():
    plan = attention_pallas_tpu.make_tpu_plan((1, 20, 8, 80), (1, 300, 8, 80), causal=True, window=None,
                                              segmented=False, scale=1.0, flash=FlashAttentionConfig(block_q=16),
                                              interpret=False)
    assert (plan.block_q, plan.q_pad, plan.block_k, plan.kv_pad, plan.head_dim_pad) == (128, 128, 128, 384, 128)
    wide = attention_pallas_tpu.make_tpu_plan((1, 4096, 8, 256), (1, 4096, 8, 256), causal=True, window=None,
                                              segmented=False, scale=1.0, flash=MIXED_TILES, interpret=False)
    assert (wide.block_q, wide.block_k, wide.block_k_dkv, wide.head_dim_pad) == (256, 128, 256, 256)


# ----------------------------------------------------------------------------------------------
# Lowering for TPU (Pallas → Mosaic MLIR), on CPU


def lower_for_tpu(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def forward_and_grad(**kwargs):
    def forward(q, k, v):
        return flash_tpu(q, k, v, interpret=False, **kwargs)

    def grad(q, k, v):
        def loss(q, k, v):
            out, lse = forward(q, k, v)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return forward, grad


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_lower_for_tpu_bf16(tpu_lowering, causal):
    q = jnp.zeros((1, 1024, 4, 128), jnp.bfloat16)
    forward, grad = forward_and_grad(causal=causal)
    text = lower_for_tpu(forward, q, q, q)
    assert "tpu_custom_call" in text and KERNEL_NAMES[0] in text
    text = lower_for_tpu(grad, q, q, q)
    assert all(name in text for name in KERNEL_NAMES)
    assert "longseq_flash_forward" not in text  # the GPU-style kernels were not used


def test_every_feature_lowers_for_tpu(tpu_lowering):
    """GQA, window, segment ids, traced offsets, ragged lengths, unaligned head_dim, float32, mixed tiles."""
    q = jnp.zeros((2, 1000, 4, 80), jnp.float32)
    kv = jnp.zeros((2, 700, 2, 80), jnp.float32)
    ids = (jnp.zeros((2, 1000), jnp.int32), jnp.zeros((2, 700), jnp.int32))

    def forward_or_grad(which):
        def fn(q, k, v, q_offset, kv_offset):
            functions = forward_and_grad(causal=True, window=300, segment_ids=ids, flash=MIXED_TILES,
                                         q_offset=q_offset, kv_offset=kv_offset)
            return functions[which](q, k, v)

        return fn

    offsets = (jnp.int32(300), jnp.int32(0))
    assert KERNEL_NAMES[0] in lower_for_tpu(forward_or_grad(0), q, kv, kv, *offsets)
    text = lower_for_tpu(forward_or_grad(1), q, kv, kv, *offsets)
    assert all(name in text for name in KERNEL_NAMES)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="a real TPU describes itself")
def test_fixture_describes_the_default_device_as_a_tpu(tpu_lowering):
    from jax._src.pallas.mosaic import tpu_info

    assert tpu_info.get_tpu_info().generation == 5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU backend's state")
def test_no_tpu_description_outside_the_fixture():
    """Runs after the lowering tests (file order): their fixture restored the registry and cache."""
    from jax._src.pallas.mosaic import tpu_info

    with pytest.raises(ValueError, match="Unsupported TPU device kind"):
        tpu_info.get_tpu_info()


def test_backward_from_given_statistics_matches_the_reference():
    """flash_attention_backward sent to the TPU kernels equals the dense backward on the same (out, lse),
    causal with offsets and ragged lengths, GQA 4:2."""
    from longseq.ops.attention import _attention_backward_reference

    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 150, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 200, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 200, 2, 64)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    common = dict(causal=True, segment_ids=None, scale=1.0 / 8.0, q_offset=60, kv_offset=0, window=None)
    out, lse = attention(q, k, v, impl="reference", causal=True, q_offset=60)
    got = attention_pallas.flash_attention_backward(q, k, v, out, lse, dout, flash=MIXED_TILES, interpret=True,
                                                    backend="tpu", **common)
    want = _attention_backward_reference(q, k, v, out, lse, dout, **common)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")
