"""Flash attention as portable Pallas kernels: a forward kernel and two backward kernels (dQ; dK and dV).

Same function as the reference in `longseq.ops.attention` (read its docstring first), computed
tile by tile so that no [q_len, kv_len] matrix ever exists:

    forward   for each block of queries, loop over blocks of keys keeping a running max m, a running
              sum l and an unnormalised output acc (the online softmax), all float32:
                  s = q·kᵀ·scale        m' = max(m, rowmax s)       p = exp(s − m')
                  l = l·exp(m − m') + rowsum p      acc = acc·exp(m − m') + p·v
              then out = acc / l and lse = m + log l.
    backward  with P = exp(S − lse) recomputed per tile and delta = rowsum(out ⊙ dout) − dlse:
                  dV = Pᵀ·dout    dP = dout·Vᵀ    dS = P ⊙ (dP − delta)    dQ = dS·K·scale    dK = dSᵀ·Q·scale
              (dlse is the cotangent of lse: ∂lse_i/∂s_ij = P_ij, so it folds into delta.)
              One kernel owns a block of keys and loops over queries (dK, dV; for GQA it also loops over
              the query heads that share the kv head, so K/V are never repeated); another owns a block
              of queries and loops over keys (dQ). Neither writes to memory another program writes.

Exponentials are taken base 2 (scores pre-multiplied by log2(e)), the cheap form on GPUs.

Visibility (causal with global offsets, sliding window, segment ids, ragged tails) is decided per
tile. Only `q_offset − kv_offset` matters, so the kernels take that one `shift`. For each block of
queries the key blocks split into three ranges, computed from the block's positions:

    [lo, full_lo)     partly visible: masked
    [full_lo, full_hi)  fully visible: no mask (most of the work)
    [full_hi, hi)     partly visible: masked
    outside [lo, hi)  invisible: skipped, never loaded (so causal costs about half)

and the dK/dV kernel does the same with the roles of queries and keys swapped.

Inputs are padded to whole tiles (sequence) and to a power of two ≥ 16 (head_dim) by the wrapper;
padded keys are masked, padded queries get lse = +inf in the backward pass (so P = 0 there), and
padded head_dim columns are zeros, which change no dot product. Lowering: Triton on GPUs (tile sizes
and pipelining from `FlashAttentionConfig`), and `interpret=True` anywhere (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from longseq.config import FlashAttentionConfig

Array = jax.Array
LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: shapes after padding, tiles, masking, lowering."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int  # true lengths (before padding)
    kv_len: int
    q_pad: int  # padded lengths (multiples of every q / kv tile)
    kv_pad: int
    head_dim_pad: int
    causal: bool
    window: int | None
    segmented: bool
    scale: float
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def masked(self) -> bool:
        """Whether any query may not see some key."""
        return self.kv_tail or self.causal or self.window is not None or self.segmented

    @property
    def kv_tail(self) -> bool:
        """Whether padded keys exist (they must be masked)."""
        return self.kv_pad != self.kv_len

    def compiler_params(self, backward: bool):
        if self.interpret:
            return None
        from jax.experimental.pallas import triton as plgpu

        if backward:
            return plgpu.CompilerParams(num_warps=self.num_warps_bwd, num_stages=self.num_stages_bwd)
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _tile(block: int, length: int, shrink: int) -> int:
    """The tile actually used: the configured one divided by `shrink`, and no longer than the
    sequence needs (a power of two >= 16)."""
    return max(16, min(block // shrink, pl.next_power_of_2(length)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_plan(q_shape, kv_shape, dtype, *, causal: bool, window: int | None, segmented: bool,
              scale: float, flash: FlashAttentionConfig, interpret: bool) -> _Plan:
    """Tiles and padding for one call. The configured tiles are for rows of 256 bytes (bf16 with
    head_dim 128); wider rows (float32, head_dim 256) divide every tile by the ratio, so that the
    tiles of one program still fit in a Hopper SM's shared memory."""
    batch, q_len, heads, head_dim = q_shape
    kv_len, kv_heads = kv_shape[1], kv_shape[2]
    head_dim_pad = max(16, pl.next_power_of_2(head_dim))
    shrink = max(1, head_dim_pad * jnp.dtype(dtype).itemsize // 256)
    q_tiles = [_tile(b, q_len, shrink) for b in (flash.block_q, flash.block_q_dkv, flash.block_q_dq)]
    kv_tiles = [_tile(b, kv_len, shrink) for b in (flash.block_k, flash.block_k_dkv, flash.block_k_dq)]
    return _Plan(
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
        q_pad=_round_up(q_len, max(q_tiles)), kv_pad=_round_up(kv_len, max(kv_tiles)),
        head_dim_pad=head_dim_pad,
        causal=causal, window=window, segmented=segmented, scale=float(scale),
        block_q=q_tiles[0], block_q_dkv=q_tiles[1], block_q_dq=q_tiles[2],
        block_k=kv_tiles[0], block_k_dkv=kv_tiles[1], block_k_dq=kv_tiles[2],
        num_warps=flash.num_warps, num_stages=flash.num_stages,
        num_warps_bwd=flash.num_warps_bwd, num_stages_bwd=flash.num_stages_bwd,
        interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Visibility, per tile and per block range (pure functions of positions; traced int32 scalars)


def _visible(plan: _Plan, q_idx, k_idx, shift, q_ids, kv_ids):
    """May query q_idx see key k_idx? bool, the broadcast shape of the arguments (None: all visible).

    q_idx, k_idx: int32 local positions (e.g. [rows, 1] and [1, cols], or transposed);
    q_ids, kv_ids: their segment ids, shaped alike, or None.
    """
    distance = q_idx + shift - k_idx  # global query position − global key position
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if plan.kv_tail:
        mask = both(mask, k_idx < plan.kv_len)
    if plan.causal:
        mask = both(mask, distance >= 0)
    if plan.window is not None:
        mask = both(mask, distance < plan.window)
        if not plan.causal:
            mask = both(mask, -distance < plan.window)
    if plan.segmented:
        mask = both(mask, q_ids == kv_ids)
    return mask


def _positions(start, rows: int, cols: int, axis: int):
    """int32 [rows, cols]: start + the index along `axis`."""
    return start + lax.broadcasted_iota(jnp.int32, (rows, cols), axis)


def _cdiv(x, b: int):
    """ceil(max(x, 0) / b) for a traced int32 x."""
    return lax.div(jnp.maximum(x, 0) + (b - 1), b)


def _floordiv(x, b: int):
    """floor(max(x, 0) / b) for a traced int32 x."""
    return lax.div(jnp.maximum(x, 0), b)


def _kv_block_ranges(plan: _Plan, q_start, rows: int, block_k: int, shift):
    """Key-block ranges for the queries [q_start, q_start + rows): (lo, full_lo, full_hi, hi)."""
    num_blocks = plan.kv_pad // block_k
    first = q_start + shift  # global position of the first query, relative to key 0
    last = first + rows - 1
    lo, hi = jnp.int32(0), jnp.int32(num_blocks)
    full_lo, full_hi = jnp.int32(0), jnp.int32(num_blocks)
    if plan.causal:  # need key ≤ query
        hi = jnp.minimum(hi, _cdiv(last + 1, block_k))
        full_hi = jnp.minimum(full_hi, _floordiv(first + 1, block_k))
    if plan.window is not None:  # need query − key < window
        lo = jnp.maximum(lo, _cdiv(first - plan.window - block_k + 2, block_k))
        full_lo = jnp.maximum(full_lo, _cdiv(last - plan.window + 1, block_k))
        if not plan.causal:  # and key − query < window
            hi = jnp.minimum(hi, _cdiv(last + plan.window, block_k))
            full_hi = jnp.minimum(full_hi, _floordiv(first + plan.window, block_k))
    if plan.kv_tail:
        full_hi = jnp.minimum(full_hi, plan.kv_len // block_k)
    if plan.segmented:
        full_lo = full_hi = lo
    hi = jnp.maximum(hi, lo)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _q_block_ranges(plan: _Plan, k_start, cols: int, block_q: int, shift):
    """Query-block ranges for the keys [k_start, k_start + cols): (lo, full_lo, full_hi, hi)."""
    num_blocks = plan.q_pad // block_q
    first = k_start - shift  # global position of the first key, relative to query 0
    last = first + cols - 1
    lo, hi = jnp.int32(0), jnp.int32(num_blocks)
    full_lo, full_hi = jnp.int32(0), jnp.int32(num_blocks)
    if plan.causal:  # need query ≥ key
        lo = jnp.maximum(lo, _floordiv(first, block_q))
        full_lo = jnp.maximum(full_lo, _cdiv(last, block_q))
    if plan.window is not None:  # need query − key < window
        hi = jnp.minimum(hi, _cdiv(last + plan.window, block_q))
        full_hi = jnp.minimum(full_hi, _floordiv(first + plan.window, block_q))
        if not plan.causal:  # and key − query < window
            lo = jnp.maximum(lo, _cdiv(first - plan.window - block_q + 2, block_q))
            full_lo = jnp.maximum(full_lo, _cdiv(last - plan.window + 1, block_q))
    if plan.kv_tail:  # a block holding padded keys is masked throughout
        partial = k_start + cols > plan.kv_len
        full_hi = jnp.where(partial, lo, full_hi)
    if plan.segmented:
        full_lo = full_hi = lo
    hi = jnp.maximum(hi, lo)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _three_loops(plan: _Plan, ranges, body, carry):
    """Run body(index, carry, masked) over the masked / unmasked / masked ranges in order."""
    lo, full_lo, full_hi, hi = ranges
    if not plan.masked:  # every key visible to every query: one loop, no mask
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _dot(a, b, *, transpose_b: bool = False):
    """a·b (or a·bᵀ) with float32 accumulation; exact float32 products for float32 inputs."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    contract = ((1,), (1,)) if transpose_b else ((1,), (0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Forward kernel: one program per (query block, batch, head); loops over key blocks.


def _forward_kernel(shift_ref, q_ref, k_ref, v_ref, *refs, plan: _Plan):
    """q_ref: [block_q, D]; k_ref, v_ref: [kv_pad, D]; outputs o_ref [block_q, D], lse_ref [block_q]."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, o_ref, lse_ref = refs
    else:
        (o_ref, lse_ref), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k = plan.block_q, plan.block_k
    q_block = plan.q_pad // block_q - 1 - pl.program_id(0)  # heaviest causal blocks first
    q_start = q_block * block_q
    shift = shift_ref[0]
    q = q_ref[...]
    q_ids = q_ids_ref[...][:, None] if plan.segmented else None
    scale = plan.scale * LOG2_E

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, transpose_b=True) * scale  # [block_q, block_k], log2 units
        if masked:
            kv_ids = kv_ids_ref[pl.ds(k_start, block_k)][None, :] if plan.segmented else None
            visible = _visible(plan, _positions(q_start, block_q, block_k, 0),
                               _positions(k_start, block_q, block_k, 1), shift, q_ids, kv_ids)
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        if masked:  # a row may have seen nothing yet: shift by 0 so exp2(-inf - 0) = 0, not NaN
            m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = jnp.exp2(m - m_new_safe)
        p = jnp.exp2(s - m_new_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(k_start, block_k), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((block_q, plan.head_dim_pad), jnp.float32)
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    ranges = _kv_block_ranges(plan, q_start, block_q, block_k, shift)
    acc, m, l = _three_loops(plan, ranges, body, (acc, m, l))

    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m * LN_2 + jnp.log(l_safe), -jnp.inf)


def _forward(plan: _Plan, shift, q, k, v, q_ids, kv_ids):
    """Padded inputs → (out [B, q_pad, H, Dp], lse [B, H, q_pad] float32)."""
    d, g, nq = plan.head_dim_pad, plan.group, plan.q_pad // plan.block_q

    def q_block(i, b, h):
        return (b, nq - 1 - i, h, 0)

    in_specs = [
        pl.BlockSpec((1,), lambda i, b, h: (0,)),
        pl.BlockSpec((pl.squeezed, plan.block_q, pl.squeezed, d), q_block),
        pl.BlockSpec((pl.squeezed, plan.kv_pad, pl.squeezed, d), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((pl.squeezed, plan.kv_pad, pl.squeezed, d), lambda i, b, h: (b, 0, h // g, 0)),
    ]
    args = [shift, q, k, v]
    if plan.segmented:
        in_specs += [pl.BlockSpec((pl.squeezed, plan.block_q), lambda i, b, h: (b, nq - 1 - i)),
                     pl.BlockSpec((pl.squeezed, plan.kv_pad), lambda i, b, h: (b, 0))]
        args += [q_ids, kv_ids]
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(nq, plan.batch, plan.heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((pl.squeezed, plan.block_q, pl.squeezed, d), q_block),
            pl.BlockSpec((pl.squeezed, pl.squeezed, plan.block_q), lambda i, b, h: (b, h, nq - 1 - i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((plan.batch, plan.heads, plan.q_pad), jnp.float32)],
        compiler_params=plan.compiler_params(backward=False),
        interpret=plan.interpret,
        name="longseq_flash_forward",
    )(*args)


# ----------------------------------------------------------------------------------------------
# Backward kernel 1: one program per (key block, batch, kv head) → dK, dV.
# Loops over the query heads of the group, and for each over query blocks.


def _dkdv_kernel(shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """q_ref, do_ref: [q_pad, group, D]; k_ref, v_ref: [block_k, D]; lse_ref, delta_ref: [group, q_pad]
    (lse in log2 units, +inf on rows that must get no gradient). Outputs dk_ref, dv_ref: [block_k, D]."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, dk_ref, dv_ref = refs
    else:
        (dk_ref, dv_ref), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k = plan.block_q_dkv, plan.block_k_dkv
    k_start = pl.program_id(0) * block_k
    shift = shift_ref[0]
    k = k_ref[...]
    v = v_ref[...]
    kv_ids = kv_ids_ref[...][:, None] if plan.segmented else None
    scale = plan.scale * LOG2_E
    ranges = _q_block_ranges(plan, k_start, block_k, block_q, shift)

    def head_body(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            q_start = pl.multiple_of(i * block_q, block_q)
            rows = pl.ds(q_start, block_q)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            lse = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            s_t = _dot(k, q, transpose_b=True) * scale  # [block_k, block_q]: scores transposed
            p_t = jnp.exp2(s_t - lse[None, :])
            if masked:
                q_ids = q_ids_ref[rows][None, :] if plan.segmented else None
                visible = _visible(plan, _positions(q_start, block_k, block_q, 1),
                                   _positions(k_start, block_k, block_q, 0), shift, q_ids, kv_ids)
                p_t = jnp.where(visible, p_t, 0.0)
            dv = dv + _dot(p_t.astype(do.dtype), do)
            dp_t = _dot(v, do, transpose_b=True)  # [block_k, block_q]
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dk + _dot(ds_t.astype(q.dtype), q)
            return dk, dv

        return _three_loops(plan, ranges, body, carry)

    zeros = jnp.zeros((block_k, plan.head_dim_pad), jnp.float32)
    dk, dv = lax.fori_loop(0, plan.group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# Backward kernel 2: one program per (query block, batch, head) → dQ. Loops over key blocks.


def _dq_kernel(shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """q_ref, do_ref: [block_q, D]; k_ref, v_ref: [kv_pad, D]; lse_ref, delta_ref: [block_q].
    Output dq_ref: [block_q, D]."""
    if plan.segmented:
        q_ids_ref, kv_ids_ref, dq_ref = refs
    else:
        (dq_ref,), q_ids_ref, kv_ids_ref = refs, None, None
    block_q, block_k = plan.block_q_dq, plan.block_k_dq
    q_start = (plan.q_pad // block_q - 1 - pl.program_id(0)) * block_q
    shift = shift_ref[0]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_ids = q_ids_ref[...][:, None] if plan.segmented else None
    scale = plan.scale * LOG2_E

    def body(j, dq, masked):
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, transpose_b=True) * scale  # [block_q, block_k]
        p = jnp.exp2(s - lse[:, None])
        if masked:
            kv_ids = kv_ids_ref[pl.ds(k_start, block_k)][None, :] if plan.segmented else None
            visible = _visible(plan, _positions(q_start, block_q, block_k, 0),
                               _positions(k_start, block_q, block_k, 1), shift, q_ids, kv_ids)
            p = jnp.where(visible, p, 0.0)
        dp = _dot(do, v, transpose_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((block_q, plan.head_dim_pad), jnp.float32)
    dq = _three_loops(plan, _kv_block_ranges(plan, q_start, block_q, block_k, shift), body, dq)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _backward(plan: _Plan, shift, q, k, v, q_ids, kv_ids, out, lse, dout, dlse):
    """Padded residuals and cotangents → (dq, dk, dv), padded."""
    d, g = plan.head_dim_pad, plan.group
    # delta_i = Σ_d out·dout − dlse_i; both [B, H, q_pad] float32.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = delta - dlse
    # Rows that saw no key (lse = -inf) and padded rows get lse = +inf: P = exp2(s − inf) = 0.
    real_row = jnp.arange(plan.q_pad) < plan.q_len
    lse2 = jnp.where(jnp.isfinite(lse) & real_row, lse * LOG2_E, jnp.inf)

    segment_specs, segment_args = [], []
    nk = plan.kv_pad // plan.block_k_dkv
    if plan.segmented:
        segment_specs = [pl.BlockSpec((pl.squeezed, plan.q_pad), lambda j, b, h: (b, 0)),
                         pl.BlockSpec((pl.squeezed, plan.block_k_dkv), lambda j, b, h: (b, j))]
        segment_args = [q_ids, kv_ids]
    kv_block = pl.BlockSpec((pl.squeezed, plan.block_k_dkv, pl.squeezed, d), lambda j, b, h: (b, j, h, 0))
    q_group = pl.BlockSpec((pl.squeezed, plan.q_pad, g, d), lambda j, b, h: (b, 0, h, 0))
    row_group = pl.BlockSpec((pl.squeezed, g, plan.q_pad), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        grid=(nk, plan.batch, plan.kv_heads),
        in_specs=[pl.BlockSpec((1,), lambda j, b, h: (0,)), q_group, kv_block, kv_block, q_group,
                  row_group, row_group, *segment_specs],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plan.compiler_params(backward=True),
        interpret=plan.interpret,
        name="longseq_flash_backward_dkdv",
    )(shift, q, k, v, dout, lse2, delta, *segment_args)

    nq = plan.q_pad // plan.block_q_dq

    def q_block(i, b, h):
        return (b, nq - 1 - i, h, 0)

    q_spec = pl.BlockSpec((pl.squeezed, plan.block_q_dq, pl.squeezed, d), q_block)
    kv_full = pl.BlockSpec((pl.squeezed, plan.kv_pad, pl.squeezed, d), lambda i, b, h: (b, 0, h // g, 0))
    row_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, plan.block_q_dq), lambda i, b, h: (b, h, nq - 1 - i))
    segment_specs = []
    if plan.segmented:
        segment_specs = [pl.BlockSpec((pl.squeezed, plan.block_q_dq), lambda i, b, h: (b, nq - 1 - i)),
                         pl.BlockSpec((pl.squeezed, plan.kv_pad), lambda i, b, h: (b, 0))]
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(nq, plan.batch, plan.heads),
        in_specs=[pl.BlockSpec((1,), lambda i, b, h: (0,)), q_spec, kv_full, kv_full, q_spec,
                  row_spec, row_spec, *segment_specs],
        out_specs=[q_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        compiler_params=plan.compiler_params(backward=True),
        interpret=plan.interpret,
        name="longseq_flash_backward_dq",
    )(shift, q, k, v, dout, lse2, delta, *segment_args)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp on padded arrays, and the public wrapper that pads and unpads


def differentiable(forward, backward):
    """The custom_vjp over padded arrays shared by the GPU and TPU kernels:

        forward(plan, shift, q, k, v, q_ids, kv_ids) -> (out, lse)
        backward(plan, shift, q, k, v, q_ids, kv_ids, out, lse, dout, dlse) -> (dq, dk, dv)

    shift and the segment ids are integers: they get no cotangent.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(plan, shift, q, k, v, q_ids, kv_ids):
        return forward(plan, shift, q, k, v, q_ids, kv_ids)

    def attend_fwd(plan, shift, q, k, v, q_ids, kv_ids):
        out, lse = forward(plan, shift, q, k, v, q_ids, kv_ids)
        return (out, lse), (shift, q, k, v, q_ids, kv_ids, out, lse)

    def attend_bwd(plan, residuals, cotangents):
        dq, dk, dv = backward(plan, *residuals, *cotangents)
        return None, dq, dk, dv, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def padded_segments_and_shift(plan: _Plan, segment_ids, q_offset, kv_offset):
    """(q_ids [B, q_pad] | None, kv_ids [B, kv_pad] | None, shift int32[1] = q_offset − kv_offset)."""
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids = jnp.pad(jnp.asarray(segment_ids[0], jnp.int32), ((0, 0), (0, plan.q_pad - plan.q_len)))
        kv_ids = jnp.pad(jnp.asarray(segment_ids[1], jnp.int32), ((0, 0), (0, plan.kv_pad - plan.kv_len)))
    shift = jnp.reshape(jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32), (1,))
    return q_ids, kv_ids, shift


_flash_padded = differentiable(_forward, _backward)


def _pad_rows(plan: _Plan, x: Array, length: int) -> Array:
    """[B, N, H, D] → [B, length, H, head_dim_pad], zero-padded."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, plan.head_dim_pad - x.shape[-1])))


def flash_attention(q: Array, k: Array, v: Array, *, causal: bool, segment_ids, scale: float,
                    q_offset, kv_offset, window: int | None, flash: FlashAttentionConfig,
                    interpret: bool, backend: str | None = None) -> tuple[Array, Array]:
    """The Pallas implementation of `longseq.ops.attention` (arguments already validated there).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    Returns out [batch, q_len, heads, head_dim] (q's dtype) and lse [batch, heads, q_len] float32.
    backend: "tpu" runs the Mosaic TPU kernels of `attention_pallas_tpu`, anything else these;
    default: jax.default_backend() at trace time.
    """
    if (backend or jax.default_backend()) == "tpu":
        from longseq.ops.attention_pallas_tpu import flash_attention_tpu

        return flash_attention_tpu(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale,
                                   q_offset=q_offset, kv_offset=kv_offset, window=window, flash=flash,
                                   interpret=interpret)
    plan = make_plan(q.shape, k.shape, q.dtype, causal=causal, window=window,
                     segmented=segment_ids is not None, scale=scale, flash=flash, interpret=interpret)
    head_dim = q.shape[-1]
    pad = functools.partial(_pad_rows, plan)
    q_p, k_p, v_p = pad(q, plan.q_pad), pad(k, plan.kv_pad), pad(v, plan.kv_pad)
    q_ids, kv_ids, shift = padded_segments_and_shift(plan, segment_ids, q_offset, kv_offset)
    out, lse = _flash_padded(plan, shift, q_p, k_p, v_p, q_ids, kv_ids)
    return out[:, :plan.q_len, :, :head_dim], lse[:, :, :plan.q_len]


def flash_attention_backward(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, *,
                             causal: bool, segment_ids, scale: float, q_offset, kv_offset,
                             window: int | None, flash: FlashAttentionConfig, interpret: bool,
                             backend: str | None = None) -> tuple[Array, Array, Array]:
    """The backward kernels on given statistics: `longseq.ops.attention_backward` (validated there).

    out, dout: [batch, q_len, heads, head_dim]; lse: [batch, heads, q_len] float32.
    Returns dq, dk, dv unpadded, in the dtypes of q, k, v.
    """
    if (backend or jax.default_backend()) == "tpu":
        from longseq.ops.attention_pallas_tpu import flash_attention_backward_tpu

        return flash_attention_backward_tpu(q, k, v, out, lse, dout, causal=causal, segment_ids=segment_ids,
                                            scale=scale, q_offset=q_offset, kv_offset=kv_offset, window=window,
                                            flash=flash, interpret=interpret)
    plan = make_plan(q.shape, k.shape, q.dtype, causal=causal, window=window,
                     segmented=segment_ids is not None, scale=scale, flash=flash, interpret=interpret)
    head_dim = q.shape[-1]
    pad = functools.partial(_pad_rows, plan)
    q_p, k_p, v_p = pad(q, plan.q_pad), pad(k, plan.kv_pad), pad(v, plan.kv_pad)
    out_p, dout_p = pad(out.astype(q.dtype), plan.q_pad), pad(dout.astype(q.dtype), plan.q_pad)
    lse_p = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, plan.q_pad - plan.q_len)))
    q_ids, kv_ids, shift = padded_segments_and_shift(plan, segment_ids, q_offset, kv_offset)
    dq, dk, dv = _backward(plan, shift, q_p, k_p, v_p, q_ids, kv_ids, out_p, lse_p, dout_p,
                           jnp.zeros_like(lse_p))
    return (dq[:, :plan.q_len, :, :head_dim], dk[:, :plan.kv_len, :, :head_dim],
            dv[:, :plan.kv_len, :, :head_dim])
