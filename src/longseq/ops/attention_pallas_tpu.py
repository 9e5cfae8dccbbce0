"""Flash attention for TPUs: the kernels of `attention_pallas` laid out the way Mosaic wants them.

Same function as `longseq.ops.attention` and same math as `attention_pallas` (read both docstrings:
the online-softmax forward; a dK/dV kernel and a dQ kernel with delta = rowsum(out ⊙ dout) − dlse).
What changes is the layout and the loops:

  layout     the wrapper transposes to [batch, heads, seq, head_dim], so every tile is a
             (seq, head_dim) matrix: sequence on sublanes, head_dim on the 128 lanes. Sequence tiles
             are powers of two >= 128 and head_dim is zero-padded to a multiple of 128, so every block
             is (8, 128)-aligned.
  loops      no in-kernel loop over a whole-sequence block: the reduction is the last grid axis,
             marked "arbitrary" (the others "parallel"), and m, l and the accumulators live in VMEM
             scratch across it. VMEM holds one tile of each operand (double-buffered by the
             pipeline), whatever the sequence length.
               forward   grid (batch, heads, q blocks, kv blocks)
               dK, dV    grid (batch, kv heads, kv blocks, group, q blocks): the reduction runs over the
                         query heads sharing the kv head, then their query blocks (GQA without repeat)
               dQ        grid (batch, heads, q blocks, kv blocks)
  skipping   per block row, the visible blocks [lo, hi) and the unmasked ones [full_lo, full_hi) come
             from `attention_pallas._kv_block_ranges` / `_q_block_ranges`, evaluated once per call in
             the wrapper into a table handed over by scalar prefetch (SMEM) with shift =
             q_offset − kv_offset. Steps outside [lo, hi) do nothing (pl.when), and their index map
             clamps to a block of [lo, hi), the one already in VMEM, so they issue no DMA either:
             causal attention moves and computes about half of what full attention does.
  row stats  per-row m, l are lane-replicated [block_q, 128]; lse leaves the forward, and lse and
             delta enter the backward, as rows [8, block_q] (sublane-replicated); q segment ids come
             lane-replicated and kv ids sublane-replicated, so the mask is plain 2-D compares.
  exp        natural exp: the TPU computes it directly (the GPU kernels use exp2 for the same reason).

The kernels also run under Pallas interpret mode (CPU tests check their numerics); the TPU lowering
is checked on CPU by lowering for platform "tpu".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longseq.config import FlashAttentionConfig
from longseq.ops.attention_pallas import (_dot, _kv_block_ranges, _Plan, _positions, _q_block_ranges,
                                          _round_up, _visible, differentiable, padded_segments_and_shift)

Array = jax.Array
LANES = 128  # the minor dimension of a TPU vector register
SUBLANES = 8  # its second-minor dimension (32-bit)
PARALLEL, ARBITRARY = "parallel", "arbitrary"


def make_tpu_plan(q_shape, kv_shape, *, causal: bool, window: int | None, segmented: bool, scale: float,
                  flash: FlashAttentionConfig, interpret: bool) -> _Plan:
    """Tiles and padding for one call: the configured tiles raised to at least 128 (lanes) and no longer
    than the sequence needs; head_dim padded to a multiple of 128."""
    batch, q_len, heads, head_dim = q_shape
    kv_len, kv_heads = kv_shape[1], kv_shape[2]

    def tile(block: int, length: int) -> int:  # configured blocks are powers of two: so is the tile
        return min(max(LANES, block), pl.next_power_of_2(max(length, LANES)))

    q_tiles = [tile(b, q_len) for b in (flash.block_q, flash.block_q_dkv, flash.block_q_dq)]
    kv_tiles = [tile(b, kv_len) for b in (flash.block_k, flash.block_k_dkv, flash.block_k_dq)]
    return _Plan(
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
        q_pad=_round_up(q_len, max(q_tiles)), kv_pad=_round_up(kv_len, max(kv_tiles)),
        head_dim_pad=_round_up(head_dim, LANES),
        causal=causal, window=window, segmented=segmented, scale=float(scale),
        block_q=q_tiles[0], block_q_dkv=q_tiles[1], block_q_dq=q_tiles[2],
        block_k=kv_tiles[0], block_k_dkv=kv_tiles[1], block_k_dq=kv_tiles[2],
        num_warps=flash.num_warps, num_stages=flash.num_stages,
        num_warps_bwd=flash.num_warps_bwd, num_stages_bwd=flash.num_stages_bwd,
        interpret=interpret)


def _compiler_params(*semantics: str):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ----------------------------------------------------------------------------------------------
# Block skipping: the range table (wrapper side), index maps and the in-kernel guard


def _range_table(ranges_fn, plan: _Plan, rows: int, other: int, num_rows: int, shift) -> Array:
    """int32 [num_rows * 4]: (lo, full_lo, full_hi, hi) of each block row, flattened (SMEM is 1-D
    friendly). A row that sees nothing gets [0, 0): no step runs and its index map stays on block 0."""
    starts = jnp.arange(num_rows, dtype=jnp.int32) * rows
    ranges = jax.vmap(lambda start: jnp.stack(ranges_fn(plan, start, rows, other, shift)))(starts)
    empty = ranges[:, :1] >= ranges[:, 3:]
    return jnp.where(empty, 0, ranges).astype(jnp.int32).reshape(-1)


def _clamp(step, table_ref, row):
    """The block step `step` of block row `row` reads: itself when visible, else the nearest visible
    one (the block already in VMEM, so skipped steps cost no DMA)."""
    lo, hi = table_ref[4 * row], table_ref[4 * row + 3]
    return jnp.minimum(jnp.maximum(step, lo), jnp.maximum(hi - 1, lo))


def _run_visible(plan: _Plan, table_ref, row, step, body):
    """body(masked) for a visible step: masked=False inside [full_lo, full_hi), True elsewhere."""
    lo, full_lo, full_hi, hi = (table_ref[4 * row + r] for r in range(4))
    visible = jnp.logical_and(lo <= step, step < hi)
    if not plan.masked:
        pl.when(visible)(functools.partial(body, masked=False))
        return
    unmasked = jnp.logical_and(full_lo <= step, step < full_hi)
    pl.when(unmasked)(functools.partial(body, masked=False))
    pl.when(jnp.logical_and(visible, jnp.logical_not(unmasked)))(functools.partial(body, masked=True))


def _lanes(x, width: int):
    """A lane-replicated [rows, 128] array widened to [rows, width] (width a multiple of 128) by
    tiling, which keeps the layout (a lane broadcast would not)."""
    return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _segment_layouts(ids, length: int):
    """int32 ids [batch, length] → (lane-replicated [batch, length, 128], sublane-replicated
    [batch, 8, length]): a column and a row tile of the mask compare without relayout."""
    batch = ids.shape[0]
    return (jnp.broadcast_to(ids[:, :, None], (batch, length, LANES)),
            jnp.broadcast_to(ids[:, None, :], (batch, SUBLANES, length)))


# ----------------------------------------------------------------------------------------------
# Forward: grid (batch, heads, q blocks, kv blocks); m, l, acc in VMEM across the kv axis.


def _forward_kernel(shift_ref, table_ref, q_ref, k_ref, v_ref, *refs, plan: _Plan):
    """q_ref: [block_q, D]; k_ref, v_ref: [block_k, D]; segment ids [block_q, 128] and [8, block_k].
    Outputs o_ref [block_q, D], lse_ref [8, block_q]; scratch m_ref, l_ref [block_q, 128], acc_ref
    [block_q, D] (float32)."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k, d = plan.block_q, plan.block_k, plan.head_dim_pad
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(masked):
        s = _dot(q_ref[...], k_ref[...], transpose_b=True) * plan.scale  # [block_q, block_k]
        if masked:
            q_ids = _lanes(q_ids_ref[...], block_k) if plan.segmented else None
            kv_ids = kv_ids_ref[:1, :] if plan.segmented else None
            visible = _visible(plan, _positions(i * block_q, block_q, block_k, 0),
                               _positions(j * block_k, block_q, block_k, 1), shift_ref[0], q_ids, kv_ids)
            s = jnp.where(visible, s, -jnp.inf)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, 128]
        if masked:  # a row may have seen nothing yet: shift by 0 so exp(-inf - 0) = 0, not NaN
            m_next_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        else:
            m_next_safe = m_next
        alpha = jnp.exp(m_prev - m_next_safe)
        p = jnp.exp(s - _lanes(m_next_safe, block_k))
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * _lanes(alpha, d) + _dot(p.astype(v.dtype), v)

    _run_visible(plan, table_ref, i, j, body)

    @pl.when(j == plan.kv_pad // block_k - 1)
    def _finish():
        l = l_ref[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_ref[...] / _lanes(l_safe, d)).astype(o_ref.dtype)
        lse = jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf)  # [block_q, 128], lanes equal
        lse_ref[...] = jnp.transpose(lse)[:SUBLANES]  # rows: [8, block_q]


def _forward(plan: _Plan, shift, q, k, v, q_ids, kv_ids):
    """q: [B, H, q_pad, Dp]; k, v: [B, KVH, kv_pad, Dp] → (out like q, lse [B, H, q_pad] float32)."""
    block_q, block_k, d, g = plan.block_q, plan.block_k, plan.head_dim_pad, plan.group
    nq, nk = plan.q_pad // block_q, plan.kv_pad // block_k
    table = _range_table(_kv_block_ranges, plan, block_q, block_k, nq, shift[0])

    def kv_block(b, h, i, j, shift_ref, table_ref):
        return b, h // g, _clamp(j, table_ref, i), 0

    in_specs = [
        pl.BlockSpec((pl.squeezed, pl.squeezed, block_q, d), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec((pl.squeezed, pl.squeezed, block_k, d), kv_block),
        pl.BlockSpec((pl.squeezed, pl.squeezed, block_k, d), kv_block),
    ]
    args = [q, k, v]
    if plan.segmented:
        in_specs += [
            pl.BlockSpec((pl.squeezed, block_q, LANES), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((pl.squeezed, SUBLANES, block_k),
                         lambda b, h, i, j, shift_ref, table_ref: (b, 0, _clamp(j, table_ref, i))),
        ]
        args += [_segment_layouts(q_ids, plan.q_pad)[0], _segment_layouts(kv_ids, plan.kv_pad)[1]]
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(plan.batch, plan.heads, nq, nk),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((pl.squeezed, pl.squeezed, block_q, d), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((pl.squeezed, pl.squeezed, SUBLANES, block_q), lambda b, h, i, j, *_: (b, h, 0, i)),
            ],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((plan.batch, plan.heads, SUBLANES, plan.q_pad), jnp.float32)],
        compiler_params=_compiler_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY),
        interpret=plan.interpret,
        name="longseq_flash_tpu_forward",
    )(shift, table, *args)
    return out, lse[:, :, 0, :]


# ----------------------------------------------------------------------------------------------
# Backward 1 → dK, dV: grid (batch, kv heads, kv blocks, group, q blocks); the last two reduce.


def _dkdv_kernel(shift_ref, table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """q_ref, do_ref: [block_q, D]; k_ref, v_ref: [block_k, D]; lse_ref, delta_ref: [8, block_q] rows
    (lse +inf on rows that get no gradient); segment ids [8, block_q] and [block_k, 128].
    Outputs dk_ref, dv_ref [block_k, D]; scratch dk_acc, dv_acc [block_k, D] float32."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        (dk_ref, dv_ref, dk_acc, dv_acc), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k = plan.block_q_dkv, plan.block_k_dkv
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = _dot(k, q, transpose_b=True) * plan.scale  # [block_k, block_q]: scores transposed
        p_t = jnp.exp(s_t - lse_ref[:1, :])
        if masked:
            q_ids = q_ids_ref[:1, :] if plan.segmented else None
            kv_ids = _lanes(kv_ids_ref[...], block_q) if plan.segmented else None
            visible = _visible(plan, _positions(i * block_q, block_k, block_q, 1),
                               _positions(j * block_k, block_k, block_q, 0), shift_ref[0], q_ids, kv_ids)
            p_t = jnp.where(visible, p_t, 0.0)
        dv_acc[...] += _dot(p_t.astype(do.dtype), do)
        dp_t = _dot(v, do, transpose_b=True)  # [block_k, block_q]
        ds_t = p_t * (dp_t - delta_ref[:1, :])
        dk_acc[...] += _dot(ds_t.astype(q.dtype), q)

    _run_visible(plan, table_ref, j, i, body)

    @pl.when(jnp.logical_and(g == plan.group - 1, i == plan.q_pad // block_q - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# Backward 2 → dQ: grid (batch, heads, q blocks, kv blocks); the kv axis reduces.


def _dq_kernel(shift_ref, table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """q_ref, do_ref: [block_q, D]; k_ref, v_ref: [block_k, D]; lse_ref, delta_ref: [8, block_q] rows;
    segment ids [block_q, 128] and [8, block_k]. Output dq_ref [block_q, D]; scratch dq_acc float32."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, dq_ref, dq_acc = refs
    else:
        (dq_ref, dq_acc), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k = plan.block_q_dq, plan.block_k_dq
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def body(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, transpose_b=True) * plan.scale  # [block_q, block_k]
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], 1))  # the row of lse as a column
        if masked:
            q_ids = _lanes(q_ids_ref[...], block_k) if plan.segmented else None
            kv_ids = kv_ids_ref[:1, :] if plan.segmented else None
            visible = _visible(plan, _positions(i * block_q, block_q, block_k, 0),
                               _positions(j * block_k, block_q, block_k, 1), shift_ref[0], q_ids, kv_ids)
            p = jnp.where(visible, p, 0.0)
        dp = _dot(do, v, transpose_b=True)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], 1))
        dq_acc[...] += _dot(ds.astype(k.dtype), k)

    _run_visible(plan, table_ref, i, j, body)

    @pl.when(j == plan.kv_pad // block_k - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * plan.scale).astype(dq_ref.dtype)


def _backward(plan: _Plan, shift, q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
    """Residuals and cotangents in the [B, H, seq_pad, Dp] layout → (dq, dk, dv) in that layout."""
    d, g = plan.head_dim_pad, plan.group
    # delta_i = Σ_d out·dout − dlse_i, as an elementwise product (a dot here could run in bf16 on TPU).
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
    # Rows that saw no key (lse = -inf) and padded rows get lse = +inf: P = exp(s − inf) = 0.
    real_row = jnp.arange(plan.q_pad) < plan.q_len
    lse = jnp.where(jnp.isfinite(lse) & real_row, lse, jnp.inf)
    row_shape = (plan.batch, plan.heads, SUBLANES, plan.q_pad)
    lse_rows, delta_rows = (jnp.broadcast_to(x[:, :, None, :], row_shape) for x in (lse, delta))
    q_lanes = q_rows = kv_lanes = kv_rows = None
    if plan.segmented:
        q_lanes, q_rows = _segment_layouts(q_ids, plan.q_pad)
        kv_lanes, kv_rows = _segment_layouts(kv_ids, plan.kv_pad)

    # dK, dV
    block_q, block_k = plan.block_q_dkv, plan.block_k_dkv
    nq, nk = plan.q_pad // block_q, plan.kv_pad // block_k
    table = _range_table(_q_block_ranges, plan, block_k, block_q, nk, shift[0])

    def q_block(b, h, j, gi, i, shift_ref, table_ref):
        return b, h * g + gi, _clamp(i, table_ref, j), 0

    def row_block(b, h, j, gi, i, shift_ref, table_ref):
        return b, h * g + gi, 0, _clamp(i, table_ref, j)

    q_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, block_q, d), q_block)
    kv_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, block_k, d), lambda b, h, j, gi, i, *_: (b, h, j, 0))
    row_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, SUBLANES, block_q), row_block)
    segment_specs, segment_args = [], []
    if plan.segmented:
        segment_specs = [
            pl.BlockSpec((pl.squeezed, SUBLANES, block_q),
                         lambda b, h, j, gi, i, shift_ref, table_ref: (b, 0, _clamp(i, table_ref, j))),
            pl.BlockSpec((pl.squeezed, block_k, LANES), lambda b, h, j, gi, i, *_: (b, j, 0)),
        ]
        segment_args = [q_rows, kv_lanes]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(plan.batch, plan.kv_heads, nk, g, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *segment_specs],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY, ARBITRARY),
        interpret=plan.interpret,
        name="longseq_flash_tpu_backward_dkdv",
    )(shift, table, q, k, v, dout, lse_rows, delta_rows, *segment_args)

    # dQ
    block_q, block_k = plan.block_q_dq, plan.block_k_dq
    nq, nk = plan.q_pad // block_q, plan.kv_pad // block_k
    table = _range_table(_kv_block_ranges, plan, block_q, block_k, nq, shift[0])

    def kv_block(b, h, i, j, shift_ref, table_ref):
        return b, h // g, _clamp(j, table_ref, i), 0

    q_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, block_q, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, block_k, d), kv_block)
    row_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, SUBLANES, block_q), lambda b, h, i, j, *_: (b, h, 0, i))
    segment_specs, segment_args = [], []
    if plan.segmented:
        segment_specs = [
            pl.BlockSpec((pl.squeezed, block_q, LANES), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((pl.squeezed, SUBLANES, block_k),
                         lambda b, h, i, j, shift_ref, table_ref: (b, 0, _clamp(j, table_ref, i))),
        ]
        segment_args = [q_lanes, kv_rows]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(plan.batch, plan.heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *segment_specs],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(PARALLEL, PARALLEL, PARALLEL, ARBITRARY),
        interpret=plan.interpret,
        name="longseq_flash_tpu_backward_dq",
    )(shift, table, q, k, v, dout, lse_rows, delta_rows, *segment_args)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp on the padded [B, H, seq, D] layout, and the public wrapper


_flash_tpu = differentiable(_forward, _backward)


def _to_tiles(plan: _Plan, x: Array, length: int) -> Array:
    """[B, N, H, D] → [B, H, length, head_dim_pad], zero-padded: the kernels' layout."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, plan.head_dim_pad - x.shape[-1])))
    return jnp.swapaxes(x, 1, 2)


def _from_tiles(x: Array, length: int, head_dim: int) -> Array:
    """The kernels' [B, H, N_pad, D_pad] → [B, length, H, head_dim]."""
    return jnp.swapaxes(x, 1, 2)[:, :length, :, :head_dim]


def flash_attention_tpu(q: Array, k: Array, v: Array, *, causal: bool, segment_ids, scale: float,
                        q_offset, kv_offset, window: int | None, flash: FlashAttentionConfig,
                        interpret: bool) -> tuple[Array, Array]:
    """The TPU Pallas implementation of `longseq.ops.attention` (arguments already validated there).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (bf16|f32).
    Returns out [batch, q_len, heads, head_dim] (q's dtype) and lse [batch, heads, q_len] float32.
    """
    plan = make_tpu_plan(q.shape, k.shape, causal=causal, window=window, segmented=segment_ids is not None,
                         scale=scale, flash=flash, interpret=interpret)
    head_dim = q.shape[-1]
    to_tiles = functools.partial(_to_tiles, plan)
    q_t, k_t, v_t = to_tiles(q, plan.q_pad), to_tiles(k, plan.kv_pad), to_tiles(v, plan.kv_pad)
    q_ids, kv_ids, shift = padded_segments_and_shift(plan, segment_ids, q_offset, kv_offset)
    out, lse = _flash_tpu(plan, shift, q_t, k_t, v_t, q_ids, kv_ids)
    return _from_tiles(out, plan.q_len, head_dim), lse[:, :, :plan.q_len]


def flash_attention_backward_tpu(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, *,
                                 causal: bool, segment_ids, scale: float, q_offset, kv_offset,
                                 window: int | None, flash: FlashAttentionConfig,
                                 interpret: bool) -> tuple[Array, Array, Array]:
    """The TPU backward kernels on given statistics (`longseq.ops.attention_backward`)."""
    plan = make_tpu_plan(q.shape, k.shape, causal=causal, window=window, segmented=segment_ids is not None,
                         scale=scale, flash=flash, interpret=interpret)
    head_dim = q.shape[-1]
    to_tiles = functools.partial(_to_tiles, plan)
    q_t, k_t, v_t = to_tiles(q, plan.q_pad), to_tiles(k, plan.kv_pad), to_tiles(v, plan.kv_pad)
    out_t, dout_t = to_tiles(out.astype(q.dtype), plan.q_pad), to_tiles(dout.astype(q.dtype), plan.q_pad)
    lse_t = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, plan.q_pad - plan.q_len)))
    q_ids, kv_ids, shift = padded_segments_and_shift(plan, segment_ids, q_offset, kv_offset)
    dq, dk, dv = _backward(plan, shift, q_t, k_t, v_t, q_ids, kv_ids, out_t, lse_t, dout_t, jnp.zeros_like(lse_t))

    return (_from_tiles(dq, plan.q_len, head_dim), _from_tiles(dk, plan.kv_len, head_dim),
            _from_tiles(dv, plan.kv_len, head_dim))
