"""What the Hopper attention kernels (`attention_hopper.py`) share: which blocks a warpgroup sees (`Mask`,
`Blocks`, `run_blocks`), the producer warpgroup's TMA ring (`produce`, `pass_over`), and the wgmma products and
register layouts with their stand-ins for the Pallas GPU interpreter (which has no layouts, no transposed refs,
no A operand in registers and no TMA reductions: there the products are jnp.dot and the reduce-add a
read-modify-write, and everything else is the kernels' own code).

`compiled` (a bool) is threaded through the helpers below: True for the GPU, False for the interpreter.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


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
        plgpu.wgmma(acc, a_tile, b_tile.transpose((1, 0)))
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


def transposed_times(compiled: bool, acc, a_tile, b_tile):
    """acc + aᵀ b. acc: [m, n] float32; a_tile: [k, m], b_tile: [k, n] bf16 shared-memory refs (wgmma with a's
    tile read transposed; jnp.dot in the interpreter)."""
    if not compiled:
        return acc + jnp.dot(a_tile[...].T, b_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a_tile.transpose((1, 0)), b_tile)
    return pl.run_state(product)(plgpu.ACC.init(acc))


FAR = 1 << 30  # farther than any index: the bound of a band that has none


def floor_div(a, b: int):
    """max(a, 0) // b: the floor of a / b clamped at 0 (a may be a traced int32 that is negative)."""
    return jnp.maximum(a, 0) // b


def ceil_div(a, b: int):
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
    start = jnp.minimum(floor_div(lo_first, block), blocks)
    end = jnp.clip(ceil_div(jnp.minimum(hi_last, FAR - 1) + 1, block), start, blocks)
    unmasked_from = jnp.clip(ceil_div(lo_last, block), start, end)
    unmasked_to = jnp.clip(floor_div(jnp.minimum(hi_first, FAR - 1) + 1, block), unmasked_from, end)
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


def row_vector(compiled: bool, ref, axis):
    """A float32 vector from shared memory in the accumulator's layout reduced along `axis` (1: one value per
    row of a block, 0: one per column)."""
    if not compiled:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def finite_lse(lse):
    """lse with −inf (a query that sees no key) read as 0: its P is 0 through the mask, never exp2(−inf + inf)."""
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def run_kernel(body, operands, out_type, scratch_types, grid, grid_names, warpgroups: int, interpret):
    """A warp-specialised kernel (`warpgroups` threads named "wg") over `grid`, as plgpu.kernel, but through
    pl.kernel so that an operand may be a GMEM Ref the kernel adds into (plgpu.kernel's wrapper takes none)."""
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=warpgroups, thread_name="wg")

    def with_scratch(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types, collective_axes="wg")
    return pl.kernel(with_scratch, out_type=out_type, mesh=mesh, interpret=interpret)(*operands)


def add_into(compiled: bool, src, dst):
    """dst += src (dst a GMEM ref, src a float32 shared-memory tile): a TMA reduce-add; in the interpreter, which
    has no TMA reductions and runs the grid's CTAs one after another, a read-modify-write."""
    if compiled:
        plgpu.copy_smem_to_gmem(src, dst, reduction_op="add")
    else:
        dst[...] = dst[...] + src[...]
