"""Prototype (issue #4): the flash-attention forward pass as a Pallas Mosaic GPU (Hopper) kernel.

Not wired into `longseq.ops` yet: bf16, head_dim a multiple of 64 (up to 256), q_len a multiple of 128, kv_len a
multiple of block_kv, causal or not with zero offsets (q_len == kv_len when causal), GQA. It is here to be
timed beside cuDNN on the GPU before it grows the backward and the features of the portable kernel
(segment ids, offsets, windows).

Shapes (longseq's layout): q: [batch, q_len, heads, head_dim], k, v: [batch, kv_len, kv_heads, head_dim] ->
out: [batch, q_len, heads, head_dim] bf16, lse: [batch, heads, q_len] float32 (natural log).

One CTA per (head, tile of 128 queries, batch element), three warpgroups:
- warpgroup 2, the producer, copies K and V blocks [block_kv, head_dim] by TMA into a ring of `stages` slots,
  refilling a slot once both consumers have released it;
- warpgroups 0 and 1 each own 64 queries (one wgmma M): S = Q Kᵀ by wgmma (K's slot read transposed), the
  online softmax in registers in base 2 (the scale and log2(e) folded into one multiply), then O += P V by
  wgmma with P as the A operand from registers.
Every consumer waits on every block's barriers and releases every block in order, even the blocks a causal
mask hides from it entirely (it skips their math): a barrier's phases are tracked by parity, so no waiter may
fall a phase behind and no arrival may run a phase ahead.

`interpret=interpret_params()` runs it in the Pallas GPU interpreter on CPU, which has no transposed refs and
no A operand in registers: there the two products are jnp.dot on the shared-memory tiles, and everything else
(the barriers, copies, masks and softmax) is the kernel's own code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_Q = 64        # queries per compute warpgroup
COMPUTE_WGS = 2
LOG2_E = math.log2(math.e)


def interpret_params():
    """The Pallas GPU interpreter's parameters (jax 0.10 keeps the class in a private module)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


ROWS = None  # to_layout's axis for a whole [rows, cols] array


def to_layout(compiled: bool, reduced_axis, x):
    """x in the wgmma accumulator's register layout (reduced_axis None), or in that layout reduced along one axis
    (1: a vector indexed by rows, 0: by columns); unchanged in the interpreter, which has no layouts."""
    if not compiled:
        return x
    layout = plgpu.Layout.WGMMA if reduced_axis is None else plgpu.Layout.WGMMA.reduce(reduced_axis)
    return plgpu.layout_cast(x, layout)


def block_iota(compiled: bool, shape, dim):
    """Indices along `dim` of a [rows, cols] block, in the accumulator's layout."""
    if compiled:
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def times_transposed(compiled: bool, a_tile, b_tile):
    """a_tile: [m, d], b_tile: [n, d] shared-memory refs (bf16) -> a bᵀ: [m, n] float32, by wgmma with b's tile
    read transposed (jnp.dot in the interpreter)."""
    if not compiled:
        return jnp.dot(a_tile[...], b_tile[...].T, preferred_element_type=jnp.float32)
    m, n = a_tile.shape[0], b_tile.shape[0]

    def product(acc):
        plgpu.wgmma(acc, a_tile, plgpu.transpose_ref(b_tile, (1, 0)))
        return acc[...]
    return pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))


def accumulate_product(compiled: bool, acc, a, b_tile):
    """acc + a b. acc: [m, n] float32, a: [m, k] bf16 in registers, b_tile: [k, n] shared-memory ref."""
    if not compiled:
        return acc + jnp.dot(a, b_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_tile)
    return pl.run_state(product)(plgpu.ACC.init(acc))


def _check(q, k, v, causal, block_kv):
    batch, q_len, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k, v: expected [batch={batch}, kv_len, kv_heads, head_dim={head_dim}] alike, got "
                         f"{k.shape} and {v.shape}")
    if not q.dtype == k.dtype == v.dtype == jnp.bfloat16:
        raise ValueError(f"q, k, v: expected bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim % 64 or head_dim > 256:
        raise ValueError(f"q: head_dim must be a multiple of 64 up to 256, got {head_dim}")
    if heads % k.shape[2]:
        raise ValueError(f"k: kv_heads {k.shape[2]} must divide heads {heads}")
    if q_len % (COMPUTE_WGS * BLOCK_Q):
        raise ValueError(f"q: q_len must be a multiple of {COMPUTE_WGS * BLOCK_Q}, got {q_len}")
    if block_kv % 64 or k.shape[1] % block_kv:
        raise ValueError(f"block_kv: must be a multiple of 64 dividing kv_len {k.shape[1]}, got {block_kv}")
    if causal and q_len != k.shape[1]:
        raise ValueError(f"causal: needs q_len == kv_len (zero offsets), got {q_len} and {k.shape[1]}")


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_kv", "stages", "interpret"))
def flash_forward(q, k, v, *, causal: bool = False, scale: float | None = None, block_kv: int = 128,
                  stages: int = 2, interpret=None):
    """(out, lse) of softmax(scale · q kᵀ, masked) v; shapes in the module docstring."""
    _check(q, k, v, causal, block_kv)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    exponent_scale = scale * LOG2_E   # exp(scale · s) = exp2(exponent_scale · s)
    kv_blocks = kv_len // block_kv
    stages = min(stages, kv_blocks)
    tile_q = COMPUTE_WGS * BLOCK_Q
    compiled = interpret is None
    wgmma_layout, row_layout = functools.partial(to_layout, compiled, ROWS), functools.partial(to_layout, compiled, 1)
    iota = functools.partial(block_iota, compiled, (BLOCK_Q, block_kv))
    scores = functools.partial(times_transposed, compiled)
    accumulate = functools.partial(accumulate_product, compiled)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_s, k_s, v_s, lse_s, q_bar, k_bar, v_bar, k_free, v_free):
        head, tile, b = lax.axis_index("heads"), lax.axis_index("q_tile"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = head // (heads // kv_heads)
        tile_base = tile * tile_q
        if causal:  # the blocks any query of the tile sees
            cta_blocks = jnp.minimum(kv_blocks, (tile_base + tile_q + block_kv - 1) // block_kv)
        else:
            cta_blocks = kv_blocks

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            def fetch(step, slot):
                rows = pl.ds(step * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_s.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_s.at[slot], v_bar.at[slot])

            for slot in range(stages):
                pl.when(slot < cta_blocks)(functools.partial(fetch, slot, slot))

            @pl.loop(stages, cta_blocks)
            def _(step):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(k_free.at[slot])  # both consumers are done with block step − stages
                plgpu.barrier_wait(v_free.at[slot])
                fetch(step, slot)

            @pl.loop(jnp.maximum(cta_blocks - stages, 0), cta_blocks)
            def _(step):  # the last blocks' releases: every phase of a barrier is observed
                plgpu.barrier_wait(k_free.at[lax.rem(step, stages)])
                plgpu.barrier_wait(v_free.at[lax.rem(step, stages)])

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            q_base = tile_base + wg * BLOCK_Q
            q_tile = q_s.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, BLOCK_Q), head], q_tile, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            if causal:  # blocks below the diagonal need no mask; blocks past the last query are skipped
                unmasked = q_base // block_kv
                visible = jnp.minimum(cta_blocks, (q_base + BLOCK_Q + block_kv - 1) // block_kv)
            else:
                unmasked = visible = kv_blocks

            def step(i, carry, masked=False):
                acc, m, l = carry
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                s = scores(q_tile, k_s.at[slot]) * exponent_scale
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    seen = (q_base + iota(0)) >= (i * block_kv + iota(1))
                    s = jnp.where(seen, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bar.at[slot])
                acc = accumulate(acc, p.astype(jnp.bfloat16), v_s.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def skip(i, _):  # a block this warpgroup never sees: keep the barriers' phases in step
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            carry = (wgmma_layout(jnp.zeros((BLOCK_Q, head_dim), jnp.float32)),
                     row_layout(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32)),
                     row_layout(jnp.zeros((BLOCK_Q,), jnp.float32)))
            carry = lax.fori_loop(0, unmasked, step, carry)
            if causal:
                carry = lax.fori_loop(unmasked, visible, functools.partial(step, masked=True), carry)
                lax.fori_loop(visible, cta_blocks, skip, None)
            acc, m, l = carry
            out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            q_tile[...] = out.astype(jnp.bfloat16)   # Q's tile is free after the last product
            lse_s[wg] = (m + jnp.log2(l)) / LOG2_E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(q_base, BLOCK_Q), head])
            plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[b, head, pl.ds(q_base, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                  jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
        grid=(heads, q_len // tile_q, batch), grid_names=("heads", "q_tile", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        scratch_types=[
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), jnp.bfloat16, transforms=tiled),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        ],
        interpret=interpret)
    return kernel(q, k, v)
