"""Prototype (issue #4): the flash-attention backward pass as one Pallas Mosaic GPU (Hopper) kernel, and
`flash_attention`, forward (flash_forward.py) and backward as one differentiable function.

Shapes as in flash_forward.py. With P = exp(scale · q kᵀ − lse) (masked), dP = dO vᵀ, delta = Σ_d dO ⊙ O per
query and dS = P ⊙ (dP − delta):

    dV = Pᵀ dO        dK = scale · dSᵀ q        dQ = scale · dS k

`backward_kernel`: one CTA per (head, tile of 128 keys, batch element); each of two compute warpgroups owns 64
keys (its K and V tiles in shared memory) and runs over the query blocks, which a producer warpgroup streams by
TMA (q, dO, and lse and delta as vectors). It works in the transposed frame: Sᵀ = k qᵀ, Pᵀ, dPᵀ = v dOᵀ, so
both accumulations (dV += Pᵀ dO, dK += dSᵀ q) take their A operand from registers and their B operand (dO, q)
from shared memory as it lies. Five products per block, as FlashAttention-2/3: the two warpgroups' dSᵀ meet in
shared memory, each multiplies its half of dQ's columns (dS k over all 128 keys) and adds it into a float32 dQ
in HBM by a TMA reduce-add (the CTAs of other key tiles add into the same rows). dK and dV come out per query
head; GQA sums the group in XLA.
Blocks are split as in the forward (`flash_forward.Mask`: unmasked, masked, skipped with the barriers kept in
step), with the same global offsets and padded tails. `flash_attention` takes lse's cotangent too: ∂lse/∂s = P,
so it enters as dS = P ⊙ (dP − (delta − dlse)).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_forward import (BLOCK_Q, COMPUTE_WGS, LOG2_E, ROWS, Mask, _check, accumulate_product, block_iota,
                           block_segments, flash_forward, interpret_params, load_shift, pad_to, pass_over, produce,
                           run_blocks, times_transposed, to_layout, with_segments)

BLOCK = 64                      # queries in a streamed block
TILE = COMPUTE_WGS * BLOCK_Q    # rows a CTA owns
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

__all__ = ["backward_kernel", "flash_attention", "interpret_params"]  # interpret_params: the tests'


def _vector(compiled: bool, ref, axis):
    """A float32 vector from shared memory in the accumulator's layout reduced along `axis` (1: one value per
    row of a block, 0: one per column)."""
    if not compiled:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def transposed_times(compiled: bool, acc, a_tile, b_tile):
    """acc + aᵀ b. acc: [m, n] float32; a_tile: [k, m], b_tile: [k, n] bf16 shared-memory refs (wgmma with a's
    tile read transposed; jnp.dot in the interpreter)."""
    if not compiled:
        return acc + jnp.dot(a_tile[...].T, b_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_tile, (1, 0)), b_tile)
    return pl.run_state(product)(plgpu.ACC.init(acc))


def _finite_lse(lse):
    """lse with −inf (a query that sees no key) read as 0: its P is 0 through the mask, never exp2(−inf + inf)."""
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def _run_kernel(body, operands, out_type, scratch_types, grid, grid_names, interpret):
    """A warp-specialised kernel (COMPUTE_WGS + 1 warpgroups named "wg") over `grid`, as plgpu.kernel, but through
    pl.kernel so that an operand may be a GMEM Ref the kernel adds into (plgpu.kernel's wrapper takes none)."""
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=COMPUTE_WGS + 1, thread_name="wg")

    def with_scratch(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types, collective_axes="wg")
    return pl.kernel(with_scratch, out_type=out_type, mesh=mesh, interpret=interpret)(*operands)


def _add_into(compiled: bool, src, dst):
    """dst += src (dst a GMEM ref, src a float32 shared-memory tile): a TMA reduce-add; in the interpreter, which
    has no TMA reductions and runs the grid's CTAs one after another, a read-modify-write."""
    if compiled:
        plgpu.copy_smem_to_gmem(src, dst, reduction_op="add")
    else:
        dst[...] = dst[...] + src[...]


@functools.partial(jax.jit, static_argnames=("causal", "segmented", "window", "kv_valid", "scale", "stages",
                                             "interpret"))
def backward_kernel(shift, q, k, v, do, lse, delta, q_seg, kv_seg, dq_acc, *, causal: bool, segmented: bool, window,
                    kv_valid: int, scale: float, stages: int = 2, interpret=None):
    """-> (dk, dv): [batch, kv_len, heads, head_dim] bf16 per query head (summed over a GQA group by the caller),
    and dq_acc += dS k ([batch, q_len, heads, head_dim] float32 GMEM Ref, zeros on entry; the caller scales it).
    q_len and kv_len multiples of 128 (padded by the caller); keys at or past kv_valid are padding; shift: [1]
    int32, q_offset − kv_offset; lse: [batch, heads, q_len] with −inf read as 0; q_seg, kv_seg: [batch, q_len]
    and [batch, kv_len] int32 segment ids, used when segmented."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    q_blocks = q_len // BLOCK
    stages = min(stages, q_blocks)
    compiled = interpret is None
    c = scale * LOG2_E
    iota = functools.partial(block_iota, compiled, (BLOCK_Q, BLOCK))
    tt = functools.partial(times_transposed, compiled)
    acc_add = functools.partial(accumulate_product, compiled)
    # dQ's columns split between the compute warpgroups (64 or more each); head_dim 64: warpgroup 0 takes all
    dq_cols = head_dim // COMPUTE_WGS if head_dim >= 64 * COMPUTE_WGS else head_dim
    dq_wgs = head_dim // dq_cols

    def body(shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref, dk_ref, dv_ref,
             k_s, v_s, q_s, do_s, lse_s, delta_s, kvseg_s, qseg_s, ds_s, dq_s, own_bar, q_bar, do_bar, q_free, do_free,
             ds_ready):
        head, tile, b = lax.axis_index("heads"), lax.axis_index("tile"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = head // (heads // kv_heads)
        tile_base = tile * TILE
        mask = Mask(causal, kv_valid, load_shift(shift_ref), segmented, window)
        tile_blocks = mask.query_blocks(tile_base, TILE, BLOCK, q_blocks)  # what any key of the tile sees
        first, last = tile_blocks.start, tile_blocks.end

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            if compiled:
                plgpu.set_max_registers(24, action="decrease")

            def fetch(i, slot):
                rows = pl.ds(i * BLOCK, BLOCK)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_s.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_s.at[slot], q_bar.at[slot])
                if segmented:
                    plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_s.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_s.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, head, rows], delta_s.at[slot], do_bar.at[slot])

            produce(fetch, first, last, stages, (q_free, do_free))

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            if compiled:
                plgpu.set_max_registers(240, action="increase")
            kv_base = tile_base + wg * BLOCK_Q
            rows = pl.ds(kv_base, BLOCK_Q)
            k_own = k_s.at[pl.ds(wg * BLOCK_Q, BLOCK_Q)]   # this warpgroup's keys in the CTA's [128, head_dim]
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_own, own_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_s.at[wg], own_bar.at[wg])
            if segmented:
                plgpu.copy_gmem_to_smem(kvseg_ref.at[b, rows], kvseg_s.at[wg], own_bar.at[wg])
            plgpu.barrier_wait(own_bar.at[wg])
            shape = (BLOCK_Q, BLOCK)   # [keys, queries]
            kv_ids = block_segments(compiled, kvseg_s.at[wg], 1, shape) if segmented else None
            cols = pl.ds(wg * dq_cols, dq_cols)

            def add_dq(i, ds_t):
                """Both warpgroups' dSᵀ [keys, queries] for query block i meet in shared memory; each then adds
                its columns of dS k (all 128 keys) into dq_acc."""
                buf = lax.rem(i, 2)   # double-buffered: a warpgroup may write block i + 1's while the other reads
                ds_s[buf, pl.ds(wg * BLOCK_Q, BLOCK_Q)] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(ds_ready)

                @pl.when(wg < dq_wgs)
                def _():
                    dq = to_layout(compiled, ROWS, jnp.zeros((BLOCK, dq_cols), jnp.float32))
                    dq = transposed_times(compiled, dq, ds_s.at[buf], k_s.at[:, cols])   # [queries, keys] [keys, cols]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last add has read dq_s
                    dq_s[wg] = dq
                    plgpu.commit_smem()
                    _add_into(compiled, dq_s.at[wg], dq_ref.at[b, pl.ds(i * BLOCK, BLOCK), head, cols])

            def step(i, carry, masked=False):
                dk, dv = carry
                slot = lax.rem(i - first, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                s_t = tt(k_own, q_s.at[slot])                                  # [keys, queries]
                if masked:
                    q_ids = block_segments(compiled, qseg_s.at[slot], 0, shape) if segmented else None
                    seen = mask.visible(i * BLOCK + iota(1), kv_base + iota(0), q_ids, kv_ids)
                    s_t = jnp.where(seen, s_t, -jnp.inf)
                lse = _vector(compiled, lse_s.at[slot], 0)
                p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse * LOG2_E, s_t.shape, [1]))
                plgpu.barrier_wait(do_bar.at[slot])
                dv = acc_add(dv, p_t.astype(jnp.bfloat16), do_s.at[slot])
                dp_t = tt(v_s.at[wg], do_s.at[slot])
                delta = _vector(compiled, delta_s.at[slot], 0)
                ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(jnp.bfloat16)
                plgpu.barrier_arrive(do_free.at[slot])
                dk = acc_add(dk, ds_t, q_s.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                add_dq(i, ds_t)
                return dk, dv

            def skip(i, _):   # a block these keys do not see: their dSᵀ is 0, and dQ's product still needs both
                pass_over(lax.rem(i - first, stages), ((q_bar, q_free), (do_bar, do_free)))
                add_dq(i, to_layout(compiled, ROWS, jnp.zeros(shape, jnp.bfloat16)))

            zero = to_layout(compiled, ROWS, jnp.zeros((BLOCK_Q, head_dim), jnp.float32))
            dk, dv = run_blocks(mask.query_blocks(kv_base, BLOCK_Q, BLOCK, q_blocks), first, last, step, skip,
                                (zero, zero))
            plgpu.barrier_arrive(ds_ready)   # the other warpgroup's last dQ product has read this one's K tile
            plgpu.barrier_wait(ds_ready)
            k_own[...] = (dk * scale).astype(jnp.bfloat16)   # the own tiles are free now
            v_s[wg] = dv.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_own, dk_ref.at[b, rows, head])
            plgpu.copy_smem_to_gmem(v_s.at[wg], dv_ref.at[b, rows, head])
            plgpu.wait_smem_to_gmem(0)

    out = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), jnp.bfloat16)
    scratch = [
        plgpu.SMEM((TILE, head_dim), jnp.bfloat16, transforms=TILED),
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, head_dim), jnp.bfloat16, transforms=TILED),
        plgpu.SMEM((stages, BLOCK, head_dim), jnp.bfloat16, transforms=TILED),
        plgpu.SMEM((stages, BLOCK, head_dim), jnp.bfloat16, transforms=TILED),
        plgpu.SMEM((stages, BLOCK), jnp.float32),
        plgpu.SMEM((stages, BLOCK), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
        plgpu.SMEM((stages, BLOCK), jnp.int32),
        plgpu.SMEM((2, TILE, BLOCK), jnp.bfloat16, transforms=TILED),   # dSᵀ [keys, queries], two buffers
        plgpu.SMEM((COMPUTE_WGS, BLOCK, dq_cols), jnp.float32),                         # dQ's columns, to add
        plgpu.Barrier(num_arrivals=2 + segmented, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=2 + segmented, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    ]
    return _run_kernel(body, (shift, q, k, v, do, _finite_lse(lse), delta, q_seg, kv_seg, dq_acc), (out, out),
                       scratch, (heads, kv_len // TILE, batch), ("heads", "tile", "batch"), interpret)


@functools.partial(jax.jit, static_argnames=("causal", "segmented", "window", "kv_valid", "scale", "interpret"))
def _gradients(shift, q, *rest, scale: float, **options):
    """(dq, dk, dv) from backward_kernel, dq added up in a float32 buffer in HBM (a Ref: jit only)."""
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = backward_kernel(shift, q, *rest, dq_acc, scale=scale, **options)
    return (dq_acc[...] * scale).astype(jnp.bfloat16), dk, dv


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, scale: float | None = None, q_offset=0,
                    kv_offset=0, window: int | None = None, interpret=None):
    """(out, lse) as `flash_forward`, differentiable in q, k and v through both (lse's cotangent too)."""
    _check(q, k, v, causal, 128)
    if q.shape[-1] > 128:
        raise ValueError(f"q: the backward kernels take head_dim up to 128 (shared memory), got {q.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift = jnp.reshape(jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32), (1,))
    segmented = segment_ids is not None
    segments = with_segments(segment_ids, q.shape[0], q.shape[1], k.shape[1])

    @jax.custom_vjp
    def attend(q, k, v, shift, segments):
        return flash_forward(q, k, v, causal=causal, segment_ids=segments if segmented else None, scale=scale,
                             q_offset=shift[0], window=window, interpret=interpret)

    def attend_fwd(q, k, v, shift, segments):
        out, lse = attend(q, k, v, shift, segments)
        return (out, lse), (q, k, v, shift, segments, out, lse)

    def attend_bwd(residuals, cotangents):
        q, k, v, shift, segments, out, lse = residuals
        do, dlse = cotangents
        q_len, (batch, kv_len, kv_heads, head_dim) = q.shape[1], k.shape
        do = do.astype(jnp.bfloat16)
        # delta − dlse: lse's cotangent enters dS = P ⊙ (dP − delta + dlse) (∂lse/∂s = P)
        delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32)) - dlse
        padded = ([pad_to(x, TILE) for x in (q, k, v, do)] + [pad_to(lse, TILE, 2), pad_to(delta, TILE, 2)]
                  + [pad_to(ids, TILE) for ids in segments])
        options = dict(causal=causal, segmented=segmented, window=window, kv_valid=kv_len, scale=scale,
                       interpret=interpret)
        dq, dk, dv = _gradients(shift, *padded, **options)
        dq, dk, dv = dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
        group = q.shape[2] // kv_heads

        def per_kv_head(x):  # [batch, kv_len, heads, d] -> summed over each group of query heads
            return x.reshape(batch, kv_len, kv_heads, group, head_dim).astype(jnp.float32).sum(3).astype(k.dtype)
        return dq, per_kv_head(dk), per_kv_head(dv), None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, shift, segments)
