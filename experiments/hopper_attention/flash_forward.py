"""Prototype (issue #4): the flash-attention forward pass as a Pallas Mosaic GPU (Hopper) kernel.

Not wired into `longseq.ops` yet: bf16, head_dim a multiple of 64 (up to 256), any q_len and kv_len (padded to
tiles inside, the padding masked), causal or not with global offsets (traced or not), segment ids, sliding
windows, GQA. It is here to be
timed beside cuDNN on the GPU before it takes the place of the portable kernel on Hopper.

Shapes (longseq's layout): q: [batch, q_len, heads, head_dim], k, v: [batch, kv_len, kv_heads, head_dim] ->
out: [batch, q_len, heads, head_dim] bf16, lse: [batch, heads, q_len] float32 (natural log).

One CTA per (head, tile of 128 queries, batch element), three warpgroups:
- warpgroup 2, the producer, copies K and V blocks [block_kv, head_dim] by TMA into a ring of `stages` slots,
  refilling a slot once both consumers have released it;
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

`interpret=interpret_params()` runs it in the Pallas GPU interpreter on CPU, which has no transposed refs and
no A operand in registers: there the two products are jnp.dot on the shared-memory tiles, and everything else
(the barriers, copies, masks and softmax) is the kernel's own code.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def times_transposed(compiled: bool, a_tile, b_tile, then=None):
    """a_tile: [m, d], b_tile: [n, d] shared-memory refs (bf16) -> a bᵀ: [m, n] float32, by wgmma with b's tile
    read transposed (jnp.dot in the interpreter). then(): run after the product is issued, before it is awaited."""
    if not compiled:
        result = jnp.dot(a_tile[...], b_tile[...].T, preferred_element_type=jnp.float32)
        if then is not None:
            then()
        return result
    m, n = a_tile.shape[0], b_tile.shape[0]

    def product(acc):
        plgpu.wgmma(acc, a_tile, plgpu.transpose_ref(b_tile, (1, 0)))
        if then is not None:
            then()
        return acc[...]
    return pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))


def accumulate_product(compiled: bool, acc, a, b_tile):
    """acc + a b. acc: [m, n] float32, a: [m, k] bf16 in registers, b_tile: [k, n] shared-memory ref."""
    if not compiled:
        return acc + jnp.dot(a, b_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_tile)
    return pl.run_state(product)(plgpu.ACC.init(acc))


FAR = 1 << 30  # farther than any index: the bound of a band that has none


def _floor_div(a, b: int):
    """max(a, 0) // b: the floor of a / b clamped at 0 (a may be a traced int32 that is negative)."""
    return jnp.maximum(a, 0) // b


def _ceil_div(a, b: int):
    return (jnp.maximum(a, 0) + b - 1) // b


class Blocks(NamedTuple):
    """How a warpgroup's rows see the streamed blocks [0, n): [start, unmasked_from) and [unmasked_to, end) in
    part (masked), [unmasked_from, unmasked_to) whole, the rest not at all (skipped)."""
    start: object
    unmasked_from: object
    unmasked_to: object
    end: object


def band_blocks(lo_first, lo_last, hi_first, hi_last, block: int, blocks: int, whole=True) -> Blocks:
    """Owned rows r see the streamed indices lo(r) ... hi(r) (inclusive), both rising with r; lo_first, hi_first
    are the first owned row's bounds, lo_last, hi_last the last's. whole false (a bool or a traced one): no block
    is seen whole."""
    start = jnp.minimum(_floor_div(lo_first, block), blocks)
    end = jnp.clip(_ceil_div(jnp.minimum(hi_last, FAR - 1) + 1, block), start, blocks)
    unmasked_from = jnp.clip(_ceil_div(lo_last, block), start, end)
    unmasked_to = jnp.clip(_floor_div(jnp.minimum(hi_first, FAR - 1) + 1, block), unmasked_from, end)
    return Blocks(start, unmasked_from, jnp.where(whole, unmasked_to, unmasked_from), end)


class Mask(NamedTuple):
    """Which (query i, key j) pairs are visible, with d = (q_offset + i) − (kv_offset + j) = i + shift − j:
    j < kv_valid (the rest is padding); with causal d >= 0; with a window d < window (causal) or |d| < window;
    with segmented, the same segment (then no block is seen whole)."""
    causal: bool
    kv_valid: int
    shift: object = 0   # q_offset − kv_offset: an int, or a traced int32 scalar
    segmented: bool = False
    window: int | None = None

    def visible(self, q_pos, kv_pos, q_seg=None, kv_seg=None):
        d = q_pos + self.shift - kv_pos
        seen = kv_pos < self.kv_valid
        if self.causal:
            seen = seen & (d >= 0)
        if self.window is not None:
            seen = seen & (d < self.window) & (self.causal | (d > -self.window))
        return seen & (q_seg == kv_seg) if self.segmented else seen

    def _key_band(self, i):
        """(lowest, highest) key query i may see."""
        w = self.window
        lo = i + self.shift - w + 1 if w is not None else -FAR
        hi = i + self.shift if self.causal else (i + self.shift + w - 1 if w is not None else FAR)
        return lo, jnp.minimum(hi, self.kv_valid - 1)

    def key_blocks(self, q_first, q_rows: int, block: int, blocks: int) -> Blocks:
        """The key blocks of `block` rows as the queries [q_first, q_first + q_rows) see them."""
        (lo_first, hi_first), (lo_last, hi_last) = self._key_band(q_first), self._key_band(q_first + q_rows - 1)
        return band_blocks(lo_first, lo_last, hi_first, hi_last, block, blocks, whole=not self.segmented)

    def query_blocks(self, kv_first, kv_rows: int, block: int, blocks: int) -> Blocks:
        """The query blocks of `block` rows as the keys [kv_first, kv_first + kv_rows) see them (keys past
        kv_valid are padding, seen by no query)."""
        w = self.window

        def band(j):  # (lowest, highest) query that sees key j
            lo = j - self.shift if self.causal else (j - self.shift - w + 1 if w is not None else -FAR)
            return lo, (j - self.shift + w - 1 if w is not None else FAR)

        (lo_first, hi_first) = band(kv_first)
        (lo_last, hi_last) = band(jnp.minimum(kv_first + kv_rows, self.kv_valid) - 1)
        whole = (kv_first + kv_rows <= self.kv_valid) & (not self.segmented)
        seen = band_blocks(lo_first, lo_last, hi_first, hi_last, block, blocks, whole)
        end = jnp.where(kv_first >= self.kv_valid, seen.start, seen.end)
        return Blocks(seen.start, jnp.minimum(seen.unmasked_from, end), jnp.minimum(seen.unmasked_to, end), end)


def run_blocks(blocks: Blocks, first, last, step, skip, carry):
    """The streamed blocks [first, last) in order: skip before blocks.start, step(masked=True) on the parts seen in
    part, step on the whole ones, skip after blocks.end (a warpgroup keeps every barrier's phases in step)."""
    blocks = Blocks(*(jnp.clip(x, first, last) for x in blocks))   # a warpgroup that sees nothing stays inside
    lax.fori_loop(first, blocks.start, skip, None)
    carry = lax.fori_loop(blocks.start, blocks.unmasked_from, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(blocks.unmasked_from, blocks.unmasked_to, step, carry)
    carry = lax.fori_loop(blocks.unmasked_to, blocks.end, functools.partial(step, masked=True), carry)
    lax.fori_loop(blocks.end, last, skip, None)
    return carry


def produce(fetch, first, last, stages: int, frees):
    """The producer warpgroup's ring: the streamed blocks [first, last) into `stages` slots by fetch(block, slot),
    a slot refilled once every consumer has released it (each barrier in `frees`); then the last releases
    are awaited, so that every phase of every barrier is observed."""
    for slot in range(stages):
        pl.when(first + slot < last)(functools.partial(fetch, first + slot, slot))

    @pl.loop(first + stages, last)
    def _(step):
        slot = lax.rem(step - first, stages)
        for free in frees:
            plgpu.barrier_wait(free.at[slot])
        fetch(step, slot)

    @pl.loop(jnp.maximum(last - stages, first), last)
    def _(step):
        for free in frees:
            plgpu.barrier_wait(free.at[lax.rem(step - first, stages)])


def kv_fetcher(b, kv_head, block: int, segmented: bool, refs, slots, loaded):
    """fetch(step, slot) for `produce`: key block `step` of batch element b and kv head kv_head (its segment ids
    too, when segmented) into a slot. refs: (k, v, kv segment ids) in HBM; slots: their shared-memory rings;
    loaded: the (k, v) barriers, the ids arriving with k."""
    (k_ref, v_ref, kvseg_ref), (k_s, v_s, kvseg_s), (k_bar, v_bar) = refs, slots, loaded

    def fetch(step, slot):
        rows = pl.ds(step * block, block)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_s.at[slot], k_bar.at[slot])
        if segmented:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[b, rows], kvseg_s.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_s.at[slot], v_bar.at[slot])
    return fetch


def pass_over(slot, pairs):
    """A streamed block a consumer does not see: wait for each (loaded, free) barrier pair's block and release it."""
    for loaded, free in pairs:
        plgpu.barrier_wait(loaded.at[slot])
        plgpu.barrier_arrive(free.at[slot])


def pad_to(x, multiple: int, axis: int = 1):
    """x zero-padded along `axis` to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    return x if not extra else jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])


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
    if block_kv not in (64, 128):
        raise ValueError(f"block_kv: expected 64 or 128, got {block_kv}")


def block_segments(compiled: bool, ref, axis: int, shape):
    """A block's segment ids from shared memory ([rows] or [cols] int32), broadcast to `shape` along the other axis
    (axis 1: one id per row, 0: one per column) in the accumulator's layout."""
    ids = ref[...] if not compiled else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))
    return lax.broadcast_in_dim(ids, shape, [1 - axis])


def with_segments(segment_ids_pair, batch, q_len, kv_len):
    """(q_ids [batch, q_len], kv_ids [batch, kv_len]) int32: the given pair, or zeros (one segment)."""
    if segment_ids_pair is None:
        return jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
    return tuple(jnp.asarray(x, jnp.int32) for x in segment_ids_pair)


def load_shift(shift_ref):
    """q_offset − kv_offset from its [1] int32 input."""
    return shift_ref[0]


def safe_max(m):
    """The running maximum with −inf (a row that has seen no key yet) read as 0, so exp2(x − it) stays finite."""
    return jnp.where(m == -jnp.inf, 0.0, m)


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "block_kv", "stages", "interpret"))
def flash_forward(q, k, v, *, causal: bool = False, segment_ids=None, scale: float | None = None, q_offset=0,
                  kv_offset=0, window: int | None = None, block_kv: int = 128, stages: int = 2, interpret=None):
    """(out, lse) of softmax(scale · q kᵀ, masked) v; shapes in the module docstring. segment_ids: None or (q_ids
    [batch, q_len], kv_ids [batch, kv_len]) integers: a query sees only keys of its segment. q_offset, kv_offset:
    global positions of q[:, 0] and k[:, 0] (ints or traced int32 scalars), used by causal and window. window:
    None or a sliding window (`Mask`). A query that sees no key gets out = 0 and lse = −inf."""
    _check(q, k, v, causal, block_kv)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    segmented = segment_ids is not None
    tile_q = COMPUTE_WGS * BLOCK_Q
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

    def body(shift_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, q_s, k_s, v_s, lse_s, qseg_s,
             kvseg_s, q_bar, k_bar, v_bar, k_free, v_free, schedule):
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
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
            plgpu.SMEM((stages, block_kv), jnp.int32),
            plgpu.Barrier(num_arrivals=1 + segmented, num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_arrivals=1 + segmented, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),   # the compute warpgroups' turns at the tensor cores
        ],
        interpret=interpret)
    out, lse = kernel(shift, q, k, v, q_seg, kv_seg)
    return out[:, :q_len], lse[:, :, :q_len]
