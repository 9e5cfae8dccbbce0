"""Flash attention as Pallas Mosaic GPU kernels for Hopper GPUs (H100 / H200): `impl="pallas_mosaic_gpu"` of
`longseq.ops.attention`. bf16; head_dim 64 or 128; GQA; causal or not with global offsets (traced or not);
segment ids; sliding windows; any q_len and kv_len (padded to tiles inside, the padding masked); (out, lse)
with lse's cotangent; queries that see no key get out 0, lse −inf and zero gradient. What the two kernels
share is in `attention_hopper_blocks.py`; `longseq.ops.attention`'s docstring defines the function and the
portable kernel (`attention_pallas.py`) computes the same one on any platform.

Shapes (longseq's layout): q: [batch, q_len, heads, head_dim], k, v: [batch, kv_len, kv_heads, head_dim] ->
out: [batch, q_len, heads, head_dim] bf16, lse: [batch, heads, q_len] float32 (natural log).

The forward (`flash_forward`). One CTA per (head, tile of 128 queries, batch element), three warpgroups:
- warpgroup 2, the producer, copies K and V blocks [block_kv, head_dim] (128 keys, or 192 on long rows:
  `block_kv_for`) by TMA into a ring of `stages` slots, refilling a slot once both consumers have released it;
- warpgroups 0 and 1 each own 64 queries (one wgmma M): S = Q Kᵀ by wgmma (K's slot read transposed), the
  online softmax in registers in base 2 (the scale and log2(e) folded into one multiply), then O += P V by
  wgmma with P as the A operand from registers.
The two compute warpgroups take turns at the tensor cores (FlashAttention-3's ping-pong): a barrier both arrive
at twice per block orders them so that one's softmax runs while the other's products do; the producer gives
its registers up (set_max_registers) for theirs.
Blocks a warpgroup sees whole run without a mask, blocks it sees in part with one, and blocks it does not see
at all (`Mask`) are skipped. Every consumer waits on every block's barriers and releases every block in order,
even the blocks it skips: a barrier's phases are tracked by parity, so no waiter may fall a phase behind and no
arrival may run a phase ahead.

The backward. With P = exp(scale · q kᵀ − lse) (masked), dP = dO vᵀ, delta = Σ_d dO ⊙ O per query and
dS = P ⊙ (dP − delta):

    dV = Pᵀ dO        dK = scale · dSᵀ q        dQ = scale · dS k

`backward_kernel`: one CTA per (head, tile of 128 keys, batch element); each of two compute warpgroups owns 64
keys (its K and V tiles in shared memory) and runs over the query blocks, which a producer warpgroup streams by
TMA (q, dO, and lse and delta as vectors). It works in the transposed frame: Sᵀ = k qᵀ, Pᵀ, dPᵀ = v dOᵀ, so
both accumulations (dV += Pᵀ dO, dK += dSᵀ q) take their A operand from registers and their B operand (dO, q)
from shared memory as it lies. Five products per block, as FlashAttention-2/3: the two warpgroups' dSᵀ meet in
shared memory, each multiplies its half of dQ's columns (dS k over all 128 keys) and adds it into a float32 dQ
in HBM by a TMA reduce-add (the CTAs of other key tiles add into the same rows). dK and dV come out per query
head; GQA sums the group in XLA.
Blocks are split as in the forward, with the same offsets and tails. lse's cotangent enters as
dS = P ⊙ (dP − (delta − dlse)) (∂lse/∂s = P).

`interpret=interpret_params()` runs both in the Pallas GPU interpreter on CPU (the tests); the design, its
measurements and its history are in experiments/hopper_attention/NOTES.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longseq.ops.attention_hopper_blocks import (ROWS, Mask, accumulate_product, add_into, block_iota, block_segments,
                                                 finite_lse, kv_fetcher, load_shift, pad_to, pass_over, produce,
                                                 row_vector, run_blocks, run_kernel, safe_max, times_transposed,
                                                 to_layout, transposed_times, with_segments)
from longseq.ops.mosaic_gpu import computed_once, interpret_params

Array = jax.Array

BLOCK_Q = 64                    # queries per compute warpgroup in the forward; keys per one in the backward
COMPUTE_WGS = 2
TILE = COMPUTE_WGS * BLOCK_Q    # rows a CTA owns
BLOCK = 64                      # queries in a block the backward streams
BLOCK_KV = 128                  # keys in a block the forward streams (64 measured 10% slower) ...
LONG_BLOCK_KV = 192             # ... or 192 on long rows without segment ids or a window (`block_kv_for`):
LONG_KV = {False: 16384, True: 32768}   # from this many keys, not causal / causal
LOG2_E = math.log2(math.e)
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
HEAD_DIMS = (64, 128)


def supports(dtype, head_dim: int) -> str | None:
    """None if the kernels take q of this dtype and head_dim, else why not (on any device: `on_hopper` says
    whether they can run)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"impl='pallas_mosaic_gpu' takes bfloat16, got {jnp.dtype(dtype).name}"
    if head_dim not in HEAD_DIMS:
        return f"impl='pallas_mosaic_gpu' takes head_dim 64 or 128, got {head_dim}"
    return None


def block_kv_for(kv_len: int, *, causal: bool, segmented: bool, window: int | None) -> int:
    """The forward's key block: 192 keys (fewer blocks, so fewer barriers, turns and rescales of O per key) from
    LONG_KV[causal] keys without segment ids or a window, else 128. Two sweeps on one H200 (bf16, head_dim 128;
    experiments/hopper_attention/NOTES.md), × cuDNN, 192 against 128: not causal 1.00-1.07x against 0.96-1.05x
    at 16K-64K keys, causal 1.00-1.01x against 0.97-0.99x at 32K-64K; 192 lost at 4K-8K (0.83-0.93x against
    0.89-0.96x) and causal at 16K (0.90-0.99x against 0.96-1.07x). Its K and V ring fits shared memory only
    without the segment ids' buffers."""
    if segmented or window is not None or kv_len < LONG_KV[causal]:
        return BLOCK_KV
    return LONG_BLOCK_KV


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "block_kv", "stages", "interpret"))
def flash_forward(q, k, v, *, causal: bool = False, segment_ids=None, scale: float | None = None, q_offset=0,
                  kv_offset=0, window: int | None = None, block_kv: int | None = None, stages: int = 2,
                  interpret=None):
    """(out, lse) of softmax(scale · q kᵀ, masked) v; shapes in the module docstring. segment_ids: None or (q_ids
    [batch, q_len], kv_ids [batch, kv_len]) integers: a query sees only keys of its segment. q_offset, kv_offset:
    global positions of q[:, 0] and k[:, 0] (ints or traced int32 scalars), used by causal and window. window:
    None or a sliding window (`Mask`). A query that sees no key gets out = 0 and lse = −inf. block_kv (a multiple
    of 64) and stages: the key blocks and the depth of their ring (None: `block_kv_for`)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    segmented = segment_ids is not None
    block_kv = block_kv or block_kv_for(kv_len, causal=causal, segmented=segmented, window=window)
    tile_q = TILE
    q_seg, kv_seg = with_segments(segment_ids, batch, q_len, kv_len)
    q, q_seg = pad_to(q, tile_q), pad_to(q_seg, tile_q)
    k, v, kv_seg = pad_to(k, block_kv), pad_to(v, block_kv), pad_to(kv_seg, block_kv)
    shift = jnp.reshape(jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32), (1,))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    exponent_scale = scale * LOG2_E   # exp(scale · s) = exp2(exponent_scale · s)
    kv_blocks = k.shape[1] // block_kv
    stages = min(stages, kv_blocks)
    compiled = interpret is None
    wgmma_layout, row_layout = functools.partial(to_layout, compiled, ROWS), functools.partial(to_layout, compiled, 1)
    iota = functools.partial(block_iota, compiled, (BLOCK_Q, block_kv))
    scores = functools.partial(times_transposed, compiled)
    accumulate = functools.partial(accumulate_product, compiled)

    def body(shift_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, q_s, k_s, v_s, lse_s, *rest):
        (qseg_s, kvseg_s), rest = (rest[:2], rest[2:]) if segmented else ((None, None), rest)
        q_bar, k_bar, v_bar, k_free, v_free, schedule = rest
        head, tile, b = lax.axis_index("heads"), lax.axis_index("q_tile"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = head // (heads // kv_heads)
        tile_base = tile * tile_q
        mask = Mask(causal, kv_len, load_shift(shift_ref), segmented, window)
        tile_blocks = mask.key_blocks(tile_base, tile_q, block_kv, kv_blocks)   # what any query of the tile sees
        first, last = tile_blocks.start, tile_blocks.end

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            if compiled:
                plgpu.set_max_registers(40, action="decrease")
            fetch = kv_fetcher(b, kv_head, block_kv, segmented, (k_ref, v_ref, kvseg_ref), (k_s, v_s, kvseg_s),
                               (k_bar, v_bar))
            produce(fetch, first, last, stages, (k_free, v_free))

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            if compiled:
                plgpu.set_max_registers(232, action="increase")
            q_base = tile_base + wg * BLOCK_Q
            q_tile = q_s.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, BLOCK_Q), head], q_tile, q_bar.at[wg])
            if segmented:
                plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(q_base, BLOCK_Q)], qseg_s.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            shape = (BLOCK_Q, block_kv)
            q_ids = block_segments(compiled, qseg_s.at[wg], 1, shape) if segmented else None

            def take_turn():
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

            def step(i, carry, masked=False):
                acc, m, l = carry   # m: the running maximum of exponent_scale · s
                slot = lax.rem(i - first, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                s = scores(q_tile, k_s.at[slot], then=take_turn)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    kv_ids = block_segments(compiled, kvseg_s.at[slot], 0, shape) if segmented else None
                    s = jnp.where(mask.visible(q_base + iota(0), i * block_kv + iota(1), q_ids, kv_ids), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * exponent_scale)
                alpha = jnp.exp2(m - safe_max(m_new))
                p = jnp.exp2(s * exponent_scale - lax.broadcast_in_dim(safe_max(m_new), s.shape, [0]))  # one FMA
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p = p.astype(jnp.bfloat16)
                if compiled:   # the softmax's values are all made before this warpgroup gives up its turn
                    acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
                plgpu.barrier_arrive(schedule)   # softmax done: the other warpgroup's turn
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(schedule)     # ... until it has issued its next product
                acc = accumulate(acc, p, v_s.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def skip(i, _):  # a block this warpgroup does not see: keep the barriers' phases in step
                pass_over(lax.rem(i - first, stages), ((k_bar, k_free), (v_bar, v_free)))
                take_turn()
                take_turn()

            carry = (wgmma_layout(jnp.zeros((BLOCK_Q, head_dim), jnp.float32)),
                     row_layout(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32)),
                     row_layout(jnp.zeros((BLOCK_Q,), jnp.float32)))
            pl.when(wg == 1)(take_turn)   # warpgroup 0 goes first
            acc, m, l = run_blocks(mask.key_blocks(q_base, BLOCK_Q, block_kv, kv_blocks), first, last, step, skip,
                                   carry)
            pl.when(wg == 0)(take_turn)   # both end with the same number of turns
            seen = l > 0
            out = acc / lax.broadcast_in_dim(jnp.where(seen, l, 1.0), acc.shape, [0])
            q_tile[...] = out.astype(jnp.bfloat16)   # Q's tile is free after the last product
            lse_s[wg] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) / LOG2_E, -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(q_base, BLOCK_Q), head])
            plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[b, head, pl.ds(q_base, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                  jax.ShapeDtypeStruct((batch, heads, q.shape[1]), jnp.float32)),
        grid=(heads, q.shape[1] // tile_q, batch), grid_names=("heads", "q_tile", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        scratch_types=[
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
            *([plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),     # segment ids, only when segmented: shared memory
               plgpu.SMEM((stages, block_kv), jnp.int32)] if segmented else []),   # is allocated in 1 KB steps
            plgpu.Barrier(num_arrivals=1 + segmented, num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_arrivals=1 + segmented, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),   # the compute warpgroups' turns at the tensor cores
        ],
        # no cross-warp reductions here (a warp owns whole rows): none of the 2 KB Mosaic GPU reserves for them
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0),
        interpret=interpret)
    out, lse = kernel(shift, q, k, v, q_seg, kv_seg)
    return out[:, :q_len], lse[:, :, :q_len]


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
                    add_into(compiled, dq_s.at[wg], dq_ref.at[b, pl.ds(i * BLOCK, BLOCK), head, cols])

            def step(i, carry, masked=False):
                dk, dv = carry
                slot = lax.rem(i - first, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                s_t = tt(k_own, q_s.at[slot])                                  # [keys, queries]
                if masked:
                    q_ids = block_segments(compiled, qseg_s.at[slot], 0, shape) if segmented else None
                    seen = mask.visible(i * BLOCK + iota(1), kv_base + iota(0), q_ids, kv_ids)
                    s_t = jnp.where(seen, s_t, -jnp.inf)
                lse = row_vector(compiled, lse_s.at[slot], 0)
                p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse * LOG2_E, s_t.shape, [1]))
                plgpu.barrier_wait(do_bar.at[slot])
                dv = acc_add(dv, p_t.astype(jnp.bfloat16), do_s.at[slot])
                dp_t = tt(v_s.at[wg], do_s.at[slot])
                delta = row_vector(compiled, delta_s.at[slot], 0)
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
    return run_kernel(body, (shift, q, k, v, do, finite_lse(lse), delta, q_seg, kv_seg, dq_acc), (out, out),
                      scratch, (heads, kv_len // TILE, batch), ("heads", "tile", "batch"), COMPUTE_WGS + 1, interpret)


@functools.partial(jax.jit, static_argnames=("causal", "segmented", "window", "kv_valid", "scale", "interpret"))
def _gradients(shift, q, *rest, scale: float, **options):
    """(dq, dk, dv) from backward_kernel, dq added up in a float32 buffer in HBM (a Ref: jit only)."""
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32), memory_space=plgpu.GMEM)
    dk, dv = backward_kernel(shift, q, *rest, dq_acc, scale=scale, **options)
    return (dq_acc[...] * scale).astype(jnp.bfloat16), dk, dv


def _offsets_and_segments(q, k, segment_ids, q_offset, kv_offset):
    """shift: [1] int32, q_offset − kv_offset; the segment ids as a pair of int32 arrays (zeros without)."""
    shift = jnp.reshape(jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32), (1,))
    return shift, with_segments(segment_ids, q.shape[0], q.shape[1], k.shape[1])


def _backward(q, k, v, out, lse, do, dlse, shift, segments, *, segmented, causal, window, scale, interpret):
    """(dq, dk, dv) in the dtypes of q, k, v; dlse: lse's cotangent (0 for the backward from statistics)."""
    q_len, (batch, kv_len, kv_heads, head_dim) = q.shape[1], k.shape
    do = do.astype(jnp.bfloat16)
    # delta − dlse: lse's cotangent enters dS = P ⊙ (dP − delta + dlse) (∂lse/∂s = P)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32)) - dlse
    padded = ([pad_to(x, TILE) for x in (q, k, v, do)] + [pad_to(lse, TILE, 2), pad_to(delta, TILE, 2)]
              + [pad_to(ids, TILE) for ids in segments])
    options = dict(causal=causal, segmented=segmented, window=window, kv_valid=kv_len, scale=scale,
                   interpret=interpret)
    dq, dk, dv = _gradients(shift, *padded, **options)
    group = q.shape[2] // kv_heads

    def per_kv_head(x):  # [batch, kv_len, heads, d] -> summed over each group of query heads
        x = x[:, :kv_len].reshape(batch, kv_len, kv_heads, group, head_dim)
        return x.astype(jnp.float32).sum(3).astype(k.dtype)
    return dq[:, :q_len].astype(q.dtype), per_kv_head(dk), per_kv_head(dv)


def _interpret_or_compiled(interpret):
    """The kernels' convention: None compiles; interpret_params() (or True) runs the interpreter."""
    if interpret is True:
        return interpret_params()
    return interpret or None


def hopper_attention(q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids=None,
                     scale: float | None = None, q_offset=0, kv_offset=0, window: int | None = None,
                     interpret=None) -> tuple[Array, Array]:
    """(out, lse) as `longseq.ops.attention` (which validates the arguments), differentiable in q, k and v
    through both (lse's cotangent too). interpret: None or False compiles for a Hopper GPU; True or
    `interpret_params()` runs the Pallas GPU interpreter."""
    reason = supports(q.dtype, q.shape[-1])
    if reason:
        raise ValueError(f"q: {reason}")
    interpret = _interpret_or_compiled(interpret)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    segmented = segment_ids is not None
    shift, segments = _offsets_and_segments(q, k, segment_ids, q_offset, kv_offset)

    @jax.custom_vjp
    def attend(q, k, v, shift, segments):
        return computed_once(flash_forward(q, k, v, causal=causal, segment_ids=segments if segmented else None,
                                           scale=scale, q_offset=shift[0], window=window, interpret=interpret))

    def attend_fwd(q, k, v, shift, segments):
        out, lse = attend(q, k, v, shift, segments)
        return (out, lse), (q, k, v, shift, segments, out, lse)

    def attend_bwd(residuals, cotangents):
        q, k, v, shift, segments, out, lse = residuals
        do, dlse = cotangents
        grads = _backward(q, k, v, out, lse, do, dlse, shift, segments, segmented=segmented, causal=causal,
                          window=window, scale=scale, interpret=interpret)
        return (*grads, None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, shift, segments)


def hopper_attention_backward(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, *,
                              causal: bool = False, segment_ids=None, scale: float | None = None, q_offset=0,
                              kv_offset=0, window: int | None = None, interpret=None) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) from saved statistics, as `longseq.ops.attention_backward` (one key block's share of a
    merged attention's gradient when out and lse are the merged ones)."""
    reason = supports(q.dtype, q.shape[-1])
    if reason:
        raise ValueError(f"q: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift, segments = _offsets_and_segments(q, k, segment_ids, q_offset, kv_offset)
    return _backward(q, k, v, out, lse.astype(jnp.float32), dout, 0.0, shift, segments,
                     segmented=segment_ids is not None, causal=causal, window=window, scale=scale,
                     interpret=_interpret_or_compiled(interpret))
