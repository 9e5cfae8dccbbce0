"""Exact self-attention over a sequence sharded across devices, with `shard_map` on a named mesh.

The global arrays are [batch, seq, heads, head_dim]. The sequence is split into P = Pq · Pkv equal
chunks over the mesh axes (seq_q, seq_kv), row-major: the device at (i, j) holds chunk c = i·Pkv + j,
tokens [c·n, (c+1)·n) with n = seq / P. Every other mesh axis (e.g. `data`) shards the batch. Inside,
every block of attention is `longseq.ops.attention` (the Pallas kernel on GPUs) with global offsets,
and partial results over key blocks merge exactly through their log-sum-exp.

Strategies (bytes each device receives per call, d = heads · head_dim, kv heads counted alike):

  allgather_kv   all-gather K and V over all P devices, attend the local queries to everything.
                 ≈ 2·N·d: the simple baseline.
  ring           pass K/V chunks around the P devices with `ppermute`, one chunk per step, merging
                 each step's partial result. ≈ 2·N·d, but only one chunk in flight (memory O(N/P)).
  ulysses        all-to-all from sequence-sharded to head-sharded, full-sequence attention on
                 heads / P heads, all-to-all back. ≈ 4·N·d / P; needs heads divisible by P.
  attention2d    ATTENTION2D (Elango 2025): device (i, j) gathers query block i (its row of the grid,
                 over seq_kv) and key/value block j (its column, over seq_q), attends one to the
                 other, and the row merges its partials exactly: a max and a sum of the row's lse
                 (tiny), then a reduce-scatter of the weighted outputs. ≈ N·d·(2/Pq + 1/Pkv)·(…) —
                 O(N·d/√P) on a square grid.
  usp            unified sequence parallelism (Fang & Zhao 2024): Ulysses over seq_kv (an all-to-all
                 within each grid row: the row's Pkv chunks, heads / Pkv heads), then ring attention
                 over seq_q on those longer chunks, then the all-to-all back. Ulysses bytes over the
                 inner axis, ring bytes over the outer; needs heads divisible by Pkv.
  double_ring    double-ring attention (LoongTrain, Gu et al. 2024): the ring over all P devices
                 split in two: K/V go around the inner ring (seq_kv, e.g. the GPUs of a node) once
                 per step of the outer ring (seq_q, e.g. across nodes), and the outer ring's transfer
                 of the next block overlaps the whole inner round. ≈ ring's bytes, but only one outer
                 transfer per Pkv inner steps.

Key/value block j of attention2d is the chunks {i'·Pkv + j}: not contiguous, so it attends as Pq
sub-blocks with their own offsets, merged through lse.

Gradients: ulysses and allgather_kv differentiate through their collectives (an all-gather's
transpose is a reduce-scatter, an all-to-all's the reverse all-to-all), which moves the same bytes
as the forward and keeps only what the backward needs anyway. ring, double_ring and attention2d have
custom_vjps that keep only this device's q, k, v, out and lse: autodiff of the ring's loop would keep
every step's K/V (O(seq) memory per device, all-gather's cost); instead the backward sends K/V
around again, with their gradient accumulators one step behind (attention2d gathers again), and
computes each block's share with `ops.attention_backward` from the merged out and lse. Every
ppermute is issued before the step's attention so that the transfer overlaps the compute. usp's
ring is the ring's, with its custom_vjp. attention2d with keep_gathered=True gathers outside its
custom_vjp instead, which then keeps the gathered blocks (as autodiff of all-gather + attention
does): one all-gather of each fewer per step, for O(seq/Pkv) K/V memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from longseq.config import BACKWARD_FROM_STATISTICS, FlashAttentionConfig
from longseq.ops import attention as attention_op
from longseq.ops import attention_backward, merge_partials

STRATEGIES = ("attention2d", "ring", "ulysses", "allgather_kv", "usp", "double_ring")
ORDERS = ("natural", "zigzag")
# The strategies that attend chunks in zigzag order as they come (ulysses and usp swap them back)
BALANCED_IN_PLACE = ("attention2d", "ring", "allgather_kv", "double_ring")

Array = jax.Array


def _check(q, k, v, segment_ids, mesh: Mesh, strategy: str, seq_axes: tuple[str, str]) -> None:
    """Raise a ValueError naming the argument that does not fit the mesh or the strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    for axis in seq_axes:
        if axis not in mesh.axis_names:
            raise ValueError(f"mesh: has no axis {axis!r} (axes {mesh.axis_names}); name the sequence axes "
                             "with seq_q_axis= / seq_kv_axis=, or give them size 1")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected [batch, seq, heads, head_dim], got shape {jnp.shape(x)}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: self-attention needs the sequence length of q ({q.shape[1]}), got {k.shape[1]}")
    seq_devices = math.prod(mesh.shape[a] for a in seq_axes)
    if q.shape[1] % seq_devices:
        raise ValueError(f"q: seq={q.shape[1]} is not divisible by the {seq_devices} devices of mesh axes "
                         f"{seq_axes}")
    batch_devices = mesh.size // seq_devices
    if q.shape[0] % batch_devices:
        raise ValueError(f"q: batch={q.shape[0]} is not divisible by the {batch_devices} devices of the "
                         "other mesh axes")
    if strategy == "ulysses" and q.shape[2] % seq_devices:
        raise ValueError(f"q: strategy 'ulysses' needs heads divisible by the {seq_devices} sequence devices, "
                         f"got heads={q.shape[2]}")
    if strategy == "usp" and q.shape[2] % mesh.shape[seq_axes[1]]:
        raise ValueError(f"q: strategy 'usp' runs Ulysses over mesh axis {seq_axes[1]!r} of "
                         f"{mesh.shape[seq_axes[1]]} devices, which needs heads divisible by "
                         f"{mesh.shape[seq_axes[1]]}; got heads={q.shape[2]}")
    if segment_ids is not None:
        if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
            raise ValueError("segment_ids: expected None or a pair (q_ids, kv_ids) of [batch, seq] ints")


def attention(q: Array, k: Array, v: Array, *, mesh: Mesh, strategy: str, causal: bool = False,
              segment_ids=None, window: int | None = None, seq_q_axis: str = "seq_q",
              seq_kv_axis: str = "seq_kv", impl: str = "auto",
              flash: FlashAttentionConfig | None = None, keep_gathered: bool = False,
              order: str = "natural") -> Array:
    """Sequence-parallel self-attention on global arrays; differentiable.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (GQA: kv_heads | heads),
        in `order` along seq.
      mesh: a mesh with axes seq_q_axis and seq_kv_axis (either may have size 1); its other axes
        shard the batch.
      strategy: one of STRATEGIES (see the module docstring).
      causal, segment_ids, window: as in `longseq.ops.attention` (segment_ids: a pair of [batch, seq]
        ints); every block attends with its global offsets, so windows cross device boundaries.
      seq_q_axis, seq_kv_axis: the mesh axes of the sequence grid (config defaults `seq_q`, `seq_kv`).
      impl, flash: the per-block attention implementation and its tiling, as in `ops.attention`
        ("auto": cuDNN on GPUs where it applies, else the Pallas kernel). ring and attention2d run
        each block's backward from the merged statistics (`ops.attention_backward`), which "xla"
        cannot.
      keep_gathered: attention2d only: keep the gathered query and key/value blocks for the backward
        pass instead of gathering them again (one all-gather of each fewer per step, as autodiff of
        all-gather + attention does) at the price of holding them: K/V memory O(seq/Pkv) per layer
        instead of O(seq/P). Off by default; under rematerialisation the blocks live for one layer's
        backward only.
      order: the order of the rows of q, k, v, the segment ids and the output. "natural": row t is
        position t; causal strategies swap half-chunks into load-balanced (zigzag) order and back on
        every call. "zigzag": the rows are already in `zigzag_order(seq, P)` (`reorder` puts them
        there), which every strategy balances with as it is: nothing is swapped in ring, double_ring,
        attention2d and allgather_kv (ulysses and usp, which attend in natural order, swap when
        positions matter). A model reorders its tokens once and keeps them so (`DecoderLM`).

    Returns:
      out: [batch, seq, heads, head_dim], sharded like q, in `order`.
    """
    seq_axes = (seq_q_axis, seq_kv_axis)
    _check(q, k, v, segment_ids, mesh, strategy, seq_axes)
    _check_order(order)
    if order == "zigzag":
        try:
            zigzag_order(q.shape[1], math.prod(mesh.shape[a] for a in seq_axes))
        except ValueError as error:
            raise ValueError(f"q: order='zigzag': {error}") from None
    if strategy in BACKWARD_FROM_STATISTICS and impl == "xla":
        raise ValueError(f"impl: strategy {strategy!r} runs each block's backward from the merged "
                         "log-sum-exp, which impl='xla' cannot; use 'auto', 'cudnn', 'pallas' or 'reference'")
    if keep_gathered not in (False, True):
        raise ValueError(f"keep_gathered: expected a bool, got {keep_gathered!r}")
    if keep_gathered and strategy != "attention2d":
        raise ValueError(f"keep_gathered: only strategy 'attention2d' gathers blocks it could keep; "
                         f"got strategy {strategy!r}")
    batch_axes = tuple(a for a in mesh.axis_names if a not in seq_axes) or None
    tokens = PartitionSpec(batch_axes, seq_axes, None, None)
    ids = PartitionSpec(batch_axes, seq_axes)
    local = dict(causal=causal, window=window, impl=impl, flash=flash, seq_len=q.shape[1],
                 grid=(mesh.shape[seq_q_axis], mesh.shape[seq_kv_axis]), axes=seq_axes, order=order)
    if keep_gathered:
        local["keep_gathered"] = True
    body = functools.partial(_STRATEGY_BODIES[strategy], **local)
    # check_vma=False: a pallas_call's outputs would have to declare how they vary over the mesh,
    # through an argument whose name differs between jax versions. Without the check, autodiff
    # transposes psum to psum, which is right here: every cotangent reaching a psum varies over its
    # axis (the tests compare every strategy's gradients with single-device attention).
    shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=tokens, check_vma=False)
    if segment_ids is None:
        fn = shard(lambda q, k, v: body(q, k, v, None), in_specs=(tokens, tokens, tokens))
        return fn(q, k, v)
    fn = shard(lambda q, k, v, q_ids, kv_ids: body(q, k, v, (q_ids, kv_ids)),
               in_specs=(tokens, tokens, tokens, ids, ids))
    return fn(q, k, v, *segment_ids)


# ----------------------------------------------------------------------------------------------
# Per-device bodies. Local shapes: q [b, n, heads, d], k, v [b, n, kv_heads, d], ids [b, n];
# n = seq / P. `axes` = (seq_q, seq_kv); a tuple of axes in a collective means their product,
# row-major, so the flat index of device (i, j) is its chunk number i·Pkv + j.
#
# Causal load balance (zigzag). With contiguous chunks the device holding the first chunk has almost
# nothing to attend to and the last one everything. For causal attention (ring, allgather_kv,
# attention2d) the bodies first swap half-chunks between devices so that device r holds the pieces
# r and 2P − 1 − r of 2P (one early, one late: equal work), and swap back at the end; this moves
# n/2 rows per device each way, small beside the strategies' own traffic. Only the sides whose
# blocks differ between devices are swapped: a side every device gathers whole (the keys of
# allgather_kv and of attention2d on a P×1 grid, the queries of attention2d on 1×P) stays in natural
# order and is cut into half-chunks to match. A device's rows are then "pieces": runs of
# consecutive positions, each attended with its own global offset. Rows that come in zigzag order
# (order="zigzag", what DecoderLM keeps) need no swap at all: both sides are zigzag chunks.


def _gather(x, axis_name, dim: int = 1):
    return lax.all_gather(x, axis_name, axis=dim, tiled=True)


def _scatter(x, axis_name):
    """Sum over the axis' devices and keep this device's chunk of the rows (the transpose of `_gather`)."""
    return lax.psum_scatter(x, axis_name, scatter_dimension=1, tiled=True)


def _zigzag_perms(devices: int):
    """ppermute pairs moving each device's first / second half-chunk to its zigzag owner."""
    def owner(piece):  # piece s of 2P goes to device s (first slot) or 2P − 1 − s (second slot)
        return piece if piece < devices else 2 * devices - 1 - piece

    first = [(d, owner(2 * d)) for d in range(devices)]
    second = [(d, owner(2 * d + 1)) for d in range(devices)]
    return first, second


def _to_zigzag(x, axes, devices: int, *, inverse: bool = False):
    """Contiguous chunk (pieces 2r, 2r+1) ↔ zigzag pieces (r, 2P − 1 − r), along axis 1.

    The first halves of all devices travel in one ppermute and the second halves in another; an even
    device receives its first slot from the first ppermute, an odd device from the second.
    """
    def permute(y, pairs):  # a ppermute, skipped when every device keeps its own (first halves, P = 2)
        return y if all(src == dst for src, dst in pairs) else lax.ppermute(y, axes, pairs)

    first, second = _zigzag_perms(devices)
    half = x.shape[1] // 2
    even = lax.axis_index(axes) % 2 == 0
    a, b = x[:, :half], x[:, half:]
    if not inverse:
        from_first, from_second = permute(a, first), permute(b, second)
        slot0 = jnp.where(even, from_first, from_second)
        slot1 = jnp.where(even, from_second, from_first)
        return jnp.concatenate([slot0, slot1], axis=1)
    to_first = jnp.where(even, a, b)  # what the first ppermute delivered here goes back through it
    to_second = jnp.where(even, b, a)
    back_first = permute(to_first, [(dst, src) for src, dst in first])
    back_second = permute(to_second, [(dst, src) for src, dst in second])
    return jnp.concatenate([back_first, back_second], axis=1)


def zigzag_order(seq_len: int, devices: int) -> np.ndarray:
    """The causal load-balanced ("zigzag") order of a sequence split over `devices` chunks.

    The sequence is cut into 2·devices equal pieces and chunk r (device r) holds pieces r and
    2·devices − 1 − r: one early, one late, the same causal work on every device. Row t of a sequence
    in this order holds position order[t], so x_zigzag = x[:, order] and x = x_zigzag[:, argsort(order)].
    """
    if devices < 1 or seq_len % (2 * devices):
        raise ValueError(f"seq_len: zigzag order over {devices} devices needs a multiple of {2 * devices} "
                         f"(two pieces per device), got {seq_len}")
    half = seq_len // (2 * devices)
    pieces = [piece for r in range(devices) for piece in (r, 2 * devices - 1 - r)]
    return np.concatenate([np.arange(p * half, (p + 1) * half) for p in pieces])


def reorder(x: Array, *, mesh: Mesh, order: str, seq_q_axis: str = "seq_q", seq_kv_axis: str = "seq_kv") -> Array:
    """x: [batch, seq, ...] from natural order into `order` ("zigzag": `zigzag_order` over the sequence
    devices of the mesh), or back with order="natural" from zigzag. Each device swaps half its chunk with
    one other (one ppermute); nothing is gathered. What a model does once at its input and output so
    that its attention layers need no per-layer exchange (`attention(..., order="zigzag")`)."""
    _check_order(order)
    seq_axes = (seq_q_axis, seq_kv_axis)
    devices = math.prod(mesh.shape[a] for a in seq_axes)
    zigzag_order(x.shape[1], devices)  # the length check, with its message
    if devices == 1:
        return x
    batch_axes = tuple(a for a in mesh.axis_names if a not in seq_axes) or None
    spec = PartitionSpec(batch_axes, seq_axes, *([None] * (x.ndim - 2)))
    swap = functools.partial(_to_zigzag, axes=seq_axes, devices=devices, inverse=order == "natural")
    return jax.shard_map(swap, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")


def _gather_zigzag(x, axis_name):
    """All-gather chunks in zigzag order as [first halves of the axis' devices, in order; then their
    second halves]: [b, n, ...] → [b, D·n, ...]. Every first-half piece precedes every second-half one,
    so a late query piece sees the first halves as one run of rows (`_zigzag_gathered_pieces`)."""
    b, n = x.shape[:2]
    halves = x.reshape(b, 2, n // 2, *x.shape[2:])
    return _gather(halves, axis_name, dim=2).reshape(b, -1, *x.shape[2:])


def _scatter_zigzag(x, axis_name):
    """The transpose of `_gather_zigzag`: sum over the axis' devices and keep this device's two halves."""
    b, rows = x.shape[:2]
    halves = x.reshape(b, 2, rows // 2, *x.shape[2:])
    return lax.psum_scatter(halves, axis_name, scatter_dimension=2, tiled=True).reshape(b, -1, *x.shape[2:])


def _zigzag_gathered_pieces(chunks, n: int, devices: int) -> list["Piece"]:
    """The pieces of `_gather_zigzag` of the zigzag chunks `chunks` (flat indices, in gather order)."""
    half, count = n // 2, len(chunks)
    return ([Piece(m * half, half, c * half, 0) for m, c in enumerate(chunks)]
            + [Piece((count + m) * half, half, (2 * devices - 1 - c) * half, 1) for m, c in enumerate(chunks)])


class Piece(NamedTuple):
    """A run of a device's rows: local first row, length, global offset of the first, and for zigzag
    pieces which half of the sequence it lies in (0: the first, 1: the second; None: not zigzag)."""

    row: int
    rows: int
    offset: Any
    half: int | None = None


def _pieces(chunk, n: int, devices: int, zigzag: bool) -> list[Piece]:
    """The pieces of a device's local rows (chunk = its flat index)."""
    return _zigzag_gathered_pieces([chunk], n, devices) if zigzag else [Piece(0, n, chunk * n)]


def _hidden(q_piece: Piece, kv_piece: Piece, causal: bool) -> bool:
    """True when causal masking hides kv_piece from q_piece whatever the devices: every zigzag piece
    of the first half precedes every piece of the second, so those pairs are not even launched."""
    return causal and q_piece.half == 0 and kv_piece.half == 1


def _block_causal(q_piece: Piece, kv_piece: Piece, causal: bool) -> bool:
    """Whether the block needs a causal mask: not when the key piece lies in the first half and the
    query piece in the second (every key visible), which the kernels then run unmasked, with no
    test of the traced offsets."""
    return causal and not (q_piece.half == 1 and kv_piece.half == 0)


def _visible_blocks(q_piece: Piece, kv_pieces: list[Piece], causal: bool,
                    window: int | None = None) -> list[tuple[Piece, list[int], bool]]:
    """The key blocks q_piece attends to: (block, indices of the kv_pieces it covers, whether it needs the
    causal mask). Pieces it cannot see are dropped, and neighbouring rows it sees unmasked are joined
    into one block (fewer, longer kernel calls and fewer partials to merge). Without a window, an
    unmasked block's positions do not matter (attention to it is the same whatever order its keys are
    in), so any consecutive rows join; with one, only consecutive static positions do."""
    blocks: list[tuple[Piece, list[int], bool]] = []
    for index, kp in enumerate(kv_pieces):
        if _hidden(q_piece, kp, causal):
            continue
        masked = _block_causal(q_piece, kp, causal)
        if blocks and not masked and not blocks[-1][2]:
            last, covered, _ = blocks[-1]
            positions_follow = (isinstance(last.offset, int) and isinstance(kp.offset, int)
                                and last.offset + last.rows == kp.offset)
            if last.row + last.rows == kp.row and (window is None or positions_follow):
                blocks[-1] = (last._replace(rows=last.rows + kp.rows), covered + [index], False)
                continue
        blocks.append((kp, [index], masked))
    return blocks


def _attend_pieces(q, k, v, q_ids, kv_ids, q_pieces, kv_pieces, *, causal, window, impl, flash):
    """Attention of each query piece to every key piece it can see, merged through lse.

    q_pieces / kv_pieces: Pieces covering q's / k's rows in order.
    Returns out [b, rows of q, heads, d] and lse [b, heads, rows of q].
    """
    outs, lses = [], []
    for qp in q_pieces:
        parts = []
        for kp, _, masked in _visible_blocks(qp, kv_pieces, causal, window):
            ids = None if q_ids is None else (q_ids[:, qp.row:qp.row + qp.rows], kv_ids[:, kp.row:kp.row + kp.rows])
            parts.append(attention_op(q[:, qp.row:qp.row + qp.rows], k[:, kp.row:kp.row + kp.rows],
                                      v[:, kp.row:kp.row + kp.rows], causal=masked,
                                      segment_ids=ids,
                                      q_offset=qp.offset, kv_offset=kp.offset, window=window, impl=impl,
                                      flash=flash))
        out, lse = parts[0] if len(parts) == 1 else merge_partials([o for o, _ in parts], [l for _, l in parts])
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _attend_pieces_backward(q, k, v, q_ids, kv_ids, out, lse, dout, q_pieces, kv_pieces, *, causal, window,
                            impl, flash, dtype):
    """This device's K/V share of the gradient, from the rows' merged out and lse.

    Returns dq [b, rows of q, heads, d] and dk, dv [b, rows of k, kv_heads, d] in `dtype`. A piece's
    terms are summed in float32 in one pass at the end (a single term is only cast), so no float32
    accumulator is written and re-read once per block.
    """
    dq_terms = [[] for _ in q_pieces]
    dk_terms = [[] for _ in kv_pieces]
    dv_terms = [[] for _ in kv_pieces]
    for qi, qp in enumerate(q_pieces):
        rows = slice(qp.row, qp.row + qp.rows)
        for kp, covered, masked in _visible_blocks(qp, kv_pieces, causal, window):
            cols = slice(kp.row, kp.row + kp.rows)
            ids = None if q_ids is None else (q_ids[:, rows], kv_ids[:, cols])
            dq, dk, dv = attention_backward(q[:, rows], k[:, cols], v[:, cols], out[:, rows], lse[:, :, rows],
                                            dout[:, rows], causal=masked, segment_ids=ids,
                                            q_offset=qp.offset, kv_offset=kp.offset, window=window, impl=impl,
                                            flash=flash)
            dq_terms[qi].append(dq)
            for ki in covered:  # a joined block's rows go back to the pieces they came from
                piece_rows = slice(kv_pieces[ki].row - kp.row, kv_pieces[ki].row - kp.row + kv_pieces[ki].rows)
                dk_terms[ki].append(dk[:, piece_rows])
                dv_terms[ki].append(dv[:, piece_rows])

    def total(terms, like, piece):
        if not terms:
            return jnp.zeros((like.shape[0], piece.rows, *like.shape[2:]), dtype)
        if len(terms) == 1:
            return terms[0].astype(dtype)
        return sum(t.astype(jnp.float32) for t in terms).astype(dtype)

    def rows_of(all_terms, like, pieces):
        return jnp.concatenate([total(t, like, p) for t, p in zip(all_terms, pieces)], axis=1)

    return rows_of(dq_terms, q, q_pieces), rows_of(dk_terms, k, kv_pieces), rows_of(dv_terms, v, kv_pieces)


def _balanced(sides):
    """Wrap a causal body in the zigzag exchange (in and out) of the sides that need it.

    sides(grid) -> (queries, keys): whether this grid's query / key-value chunks are swapped into
    zigzag order. A side whose block is the whole sequence on every device (all-gathered) needs no
    balance and is left in natural order; the output is swapped back only if the queries were.
    Chunks that come in zigzag order (order="zigzag") are balanced already: nothing is swapped and
    both sides are zigzag (without a causal mask or a window, positions do not matter and the order is
    ignored). Bodies get `zigzag` = (queries, keys).
    """

    def wrap(body):
        @functools.wraps(body)
        def run(q, k, v, segment_ids, *, causal, grid, axes, order, **kwargs):
            devices = grid[0] * grid[1]
            if order == "zigzag" and devices > 1 and (causal or kwargs["window"] is not None):
                return body(q, k, v, segment_ids, causal=causal, grid=grid, axes=axes, zigzag=(True, True),
                            **kwargs)
            balance = causal and devices > 1 and q.shape[1] % 2 == 0
            queries, keys = sides(grid) if balance else (False, False)
            swap = functools.partial(_to_zigzag, axes=axes, devices=devices)
            if queries:
                q = swap(q)
            if keys:
                k, v = swap(k), swap(v)
            if segment_ids is not None:
                segment_ids = (swap(segment_ids[0]) if queries else segment_ids[0],
                               swap(segment_ids[1]) if keys else segment_ids[1])
            out = body(q, k, v, segment_ids, causal=causal, grid=grid, axes=axes, zigzag=(queries, keys),
                       **kwargs)
            return swap(out, inverse=True) if queries else out

        return run

    return wrap


def _in_natural_order(body):
    """Wrap a body that attends in natural order (ulysses, usp): chunks that come in zigzag order are
    swapped back around it, unless positions do not matter (no causal mask, no window: attention is
    then the same whatever the order of the rows, as long as q, k, v and the ids share it)."""

    @functools.wraps(body)
    def run(q, k, v, segment_ids, *, causal, window, grid, axes, order, **kwargs):
        devices = grid[0] * grid[1]
        convert = order == "zigzag" and devices > 1 and (causal or window is not None)
        if convert:
            natural = functools.partial(_to_zigzag, axes=axes, devices=devices, inverse=True)
            q, k, v = natural(q), natural(k), natural(v)
            segment_ids = None if segment_ids is None else tuple(natural(x) for x in segment_ids)
        out = body(q, k, v, segment_ids, causal=causal, window=window, grid=grid, axes=axes, **kwargs)
        return _to_zigzag(out, axes, devices) if convert else out

    return run


def _natural_halves(devices: int, n: int) -> list[Piece]:
    """The whole sequence (all devices' chunks, in order) as 2P half-chunks with static offsets."""
    half = n // 2
    return [Piece(p * half, half, p * half, 0 if p < devices else 1) for p in range(2 * devices)]


def _keeping_own_chunk(forward, backward, q, k, v, segment_ids):
    """forward(q, k, v, q_ids, kv_ids) -> (out, statistics) under a custom_vjp that keeps only the
    device's own q, k, v, ids, out and statistics; backward(those, dout) -> (dq, dk, dv, None, None)
    moves or gathers K/V again. The optimization barrier keeps XLA from merging the backward's
    transfers with the forward's identical ones, which would keep what they brought alive between
    the passes."""

    @jax.custom_vjp
    def attend(q, k, v, q_ids, kv_ids):
        return forward(q, k, v, q_ids, kv_ids)[0]

    def attend_forward(q, k, v, q_ids, kv_ids):
        out, statistics = forward(q, k, v, q_ids, kv_ids)
        return out, (q, k, v, q_ids, kv_ids, out, statistics)

    attend.defvjp(attend_forward, lambda residuals, dout: backward(lax.optimization_barrier(residuals), dout))
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    return attend(q, k, v, q_ids, kv_ids)


@_balanced(lambda grid: (True, False))  # K/V are gathered whole: only the queries need balance
def _allgather_kv(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes, zigzag):
    n, devices = q.shape[1], grid[0] * grid[1]
    chunk = lax.axis_index(axes)

    def gather_whole(x):  # the whole sequence, in natural order
        if not zigzag[1]:
            return _gather(x, axes)
        x = _gather_zigzag(x, axes)  # pieces 0 … P − 1, then 2P − 1 … P: put the second run back in order
        first, second = x[:, :seq_len // 2], x[:, seq_len // 2:]
        second = second.reshape(x.shape[0], devices, n // 2, *x.shape[2:])[:, ::-1]
        return jnp.concatenate([first, second.reshape(first.shape)], axis=1)

    k_all, v_all = gather_whole(k), gather_whole(v)
    kv_ids = None if segment_ids is None else gather_whole(segment_ids[1])
    q_ids = None if segment_ids is None else segment_ids[0]
    # One block per query piece, against the whole sequence: autodiff needs no lse gradient. Causal,
    # its mask cuts the block at a traced offset, which cuDNN cannot mask (impl "cudnn" runs it on the
    # Pallas kernel); attention2d on a P×1 grid is this schedule with every block on cuDNN.
    out, _ = _attend_pieces(q, k_all, v_all, q_ids, kv_ids, _pieces(chunk, n, devices, zigzag[0]),
                            [Piece(0, seq_len, 0)], causal=causal, window=window, impl=impl, flash=flash)
    return out


@_balanced(lambda grid: (True, True))
def _ring(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes, zigzag):
    """K/V go around the ring; a custom_vjp keeps only this device's q, k, v, out and lse for the
    backward pass (autodiff of the loop would keep every step's K/V: O(seq) memory, like all-gather),
    and the backward sends K/V around again with their gradient accumulators."""
    n, devices = q.shape[1], grid[0] * grid[1]
    to_next = [(r, (r + 1) % devices) for r in range(devices)]
    blocks = dict(causal=causal, window=window, impl=impl, flash=flash)

    def pieces(chunk):
        return _pieces(chunk, n, devices, zigzag[0])

    def forward(q, k, v, q_ids, kv_ids):
        chunk = lax.axis_index(axes)
        out = lse = None
        for step in range(devices):  # at step s this device holds the K/V of chunk − s
            if step + 1 < devices:  # send them on first: the transfer overlaps this step's attention
                passed_on = lax.ppermute((k, v, kv_ids), axes, to_next)
            part = _attend_pieces(q, k, v, q_ids, kv_ids, pieces(chunk), pieces((chunk - step) % devices),
                                  **blocks)
            out, lse = part if out is None else merge_partials([out, part[0]], [lse, part[1]])
            if step + 1 < devices:
                k, v, kv_ids = passed_on
        return out, lse

    def backward(residuals, dout):
        q, k, v, q_ids, kv_ids, out, lse = residuals
        chunk = lax.axis_index(axes)
        dq = arriving = None
        for step in range(devices):
            if step + 1 < devices:
                passed_on = lax.ppermute((k, v, kv_ids), axes, to_next)
            dq_s, dk_s, dv_s = _attend_pieces_backward(q, k, v, q_ids, kv_ids, out, lse, dout, pieces(chunk),
                                                       pieces((chunk - step) % devices), **blocks,
                                                       dtype=jnp.float32)
            dq = dq_s if dq is None else dq + dq_s
            if arriving is not None:  # what the devices before this one computed for the same K/V
                dk_s, dv_s = dk_s + arriving[0], dv_s + arriving[1]
            if step + 1 == devices:  # finished: sent home (the K/V held here last belong to chunk + 1)
                dk_s, dv_s = dk_s.astype(k.dtype), dv_s.astype(v.dtype)  # in their dtype: half the bytes
            arriving = (dk_s, dv_s) if devices == 1 else lax.ppermute((dk_s, dv_s), axes, to_next)  # in float32
            if step + 1 < devices:
                k, v, kv_ids = passed_on
        dk, dv = arriving
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return _keeping_own_chunk(forward, backward, q, k, v, segment_ids)


@_balanced(lambda grid: (True, True))
def _double_ring(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes, zigzag):
    """The ring over P = Pq·Pkv devices as two rings: device (i, j) is position j of the inner ring
    of node i (seq_kv) and node i is position i of the outer ring (seq_q). At outer step t the node
    holds the K/V of node i − t, which go once around the inner ring; the transfer that brings node
    i − t − 1's K/V (outer ring) is issued before that inner round and overlaps it. The custom_vjp
    is the ring's: the backward repeats the rounds; each K/V chunk's gradient sums follow it around
    the inner ring, wait for the same chunk on the next node (one outer hop per round), and go home
    at the end: P hops in all, like the ring's."""
    rows, cols = grid
    row_axis, col_axis = axes
    n, devices = q.shape[1], rows * cols
    inner_next = [(j, (j + 1) % cols) for j in range(cols)]
    outer_next = [(i, (i + 1) % rows) for i in range(rows)]
    blocks = dict(causal=causal, window=window, impl=impl, flash=flash)

    def pieces(chunk):
        return _pieces(chunk, n, devices, zigzag[0])

    rounds = [(t, s_) for t in range(rows) for s_ in range(cols)]  # (outer step, inner step), in order

    def held_chunk(i, j, t, s_):  # the chunk device (i, j) holds at outer step t, inner step s_
        return ((i - t) % rows) * cols + (j - s_) % cols

    def forward(q, k, v, q_ids, kv_ids):
        i, j = lax.axis_index(row_axis), lax.axis_index(col_axis)
        chunk = i * cols + j
        out = lse = None
        node_block = (k, v, kv_ids)  # this device's share of the outer block held in this outer step
        for t, s_ in rounds:
            if s_ == 0:
                held = node_block
                if t + 1 < rows:  # the next outer block, under the whole inner round
                    next_node_block = lax.ppermute(node_block, row_axis, outer_next)
            if s_ + 1 < cols:
                passed_on = lax.ppermute(held, col_axis, inner_next)
            part = _attend_pieces(q, *held[:2], q_ids, held[2], pieces(chunk), pieces(held_chunk(i, j, t, s_)),
                                  **blocks)
            out, lse = part if out is None else merge_partials([out, part[0]], [lse, part[1]])
            if s_ + 1 < cols:
                held = passed_on
            elif t + 1 < rows:
                node_block = next_node_block
        return out, lse

    def backward(residuals, dout):
        q, k, v, q_ids, kv_ids, out, lse = residuals
        i, j = lax.axis_index(row_axis), lax.axis_index(col_axis)
        chunk = i * cols + j
        home = [(d, ((d // cols + 1) % rows) * cols + (d % cols + 1) % cols) for d in range(devices)]
        dq = inner = outer = None
        node_block = (k, v, kv_ids)
        for t, s_ in rounds:
            if s_ == 0:
                held, inner = node_block, None
                if t + 1 < rows:
                    next_node_block = lax.ppermute(node_block, row_axis, outer_next)
            if s_ + 1 < cols:
                passed_on = lax.ppermute(held, col_axis, inner_next)
            dq_s, dk_s, dv_s = _attend_pieces_backward(q, *held[:2], q_ids, held[2], out, lse, dout, pieces(chunk),
                                                       pieces(held_chunk(i, j, t, s_)), **blocks,
                                                       dtype=jnp.float32)
            dq = dq_s if dq is None else dq + dq_s
            if inner is not None:  # what this node's devices before this one computed for the same K/V
                dk_s, dv_s = dk_s + inner[0], dv_s + inner[1]
            if s_ + 1 < cols:  # the partial sums follow their K/V around the inner ring, in float32
                inner = lax.ppermute((dk_s, dv_s), col_axis, inner_next)
                held = passed_on
                continue
            # The node's sums for the chunk held last, (i − t, j + 1), plus the nodes' before it: the next
            # node holds the same chunk at the end of its next round on the same inner position; after the
            # last round they go home, one node on and one inner position on, in their dtype.
            if outer is not None:
                dk_s, dv_s = dk_s + outer[0], dv_s + outer[1]
            if t + 1 < rows:
                outer = lax.ppermute((dk_s, dv_s), row_axis, outer_next)
                node_block = next_node_block
            else:
                outer = lax.ppermute((dk_s.astype(k.dtype), dv_s.astype(v.dtype)), axes, home)
        dk, dv = outer
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return _keeping_own_chunk(forward, backward, q, k, v, segment_ids)


def _to_heads(q, k, v, segment_ids, axis, devices: int):
    """Ulysses' all-to-all over `axis` (D devices): [b, n, h, d] sequence-sharded → [b, D·n, h / D, d]
    head-sharded, for q, k and v (kv heads repeated when there are fewer than D, so that every
    device holds whole kv heads for its query heads); the segment ids are all-gathered."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads % devices:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)

    def move(x):
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    ids = None if segment_ids is None else tuple(_gather(x, axis) for x in segment_ids)
    return move(q), move(k), move(v), ids


def _to_sequence(out, axis):
    """The reverse all-to-all: [b, D·n, h / D, d] → [b, n, h, d]."""
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


@_in_natural_order
def _ulysses(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes):
    q, k, v, ids = _to_heads(q, k, v, segment_ids, axes, grid[0] * grid[1])
    out, _ = attention_op(q, k, v, causal=causal, segment_ids=ids, window=window, impl=impl, flash=flash)
    return _to_sequence(out, axes)


@_in_natural_order
def _usp(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes):
    """Ulysses over seq_kv turns device (i, j)'s chunk into grid row i's Pkv chunks (one contiguous
    block of the sequence) on heads / Pkv; ring attention over seq_q then passes those blocks around
    the Pq devices with the same heads (zigzag-balanced when causal); the all-to-all goes back."""
    rows, cols = grid
    row_axis, col_axis = axes
    q, k, v, ids = _to_heads(q, k, v, segment_ids, col_axis, cols)
    out = _ring(q, k, v, ids, causal=causal, window=window, impl=impl, flash=flash, seq_len=seq_len,
                grid=(rows, 1), axes=(row_axis,), order="natural")
    return _to_sequence(out, col_axis)


@_balanced(lambda grid: (grid[0] > 1, grid[1] > 1))  # a 1×P grid gathers all queries, a P×1 grid all keys
def _attention2d(q, k, v, segment_ids, *, causal, window, impl, flash, seq_len, grid, axes, zigzag,
                 keep_gathered=False):
    """Device (i, j) attends query block i (gathered over its grid row) to key block j (gathered
    over its grid column); the row merges its partials exactly through their lse and scatters the
    output. A custom_vjp keeps only this device's q, k, v, out and the row's lse: the backward
    gathers again (q, out, dout over the row; k, v over the column), runs each block's backward
    from the merged statistics, and reduce-scatters dq over the row and dk, dv over the column."""
    (rows, cols), (row_axis, col_axis) = grid, axes  # Pq × Pkv; row i = seq_q index, column j = seq_kv
    n, devices = q.shape[1], rows * cols
    blocks = dict(causal=causal, window=window, impl=impl, flash=flash)
    # A zigzag side is gathered as its chunks' first halves, then their second halves; a natural one
    # in chunk order. The reduce-scatters are their transposes.
    gather_q, scatter_q = (_gather_zigzag, _scatter_zigzag) if zigzag[0] else (_gather, _scatter)
    gather_kv, scatter_kv = (_gather_zigzag, _scatter_zigzag) if zigzag[1] else (_gather, _scatter)

    def index(axis, size):  # static on an axis of one device, so offsets there stay static
        return 0 if size == 1 else lax.axis_index(axis)

    def pieces():
        if not causal and window is None:  # positions do not matter: one block each way
            return [Piece(0, cols * n, 0)], [Piece(0, rows * n, 0)]
        i, j = index(row_axis, rows), index(col_axis, cols)
        if not any(zigzag):  # contiguous chunks: the query block is one run, and so is the kv block when Pkv = 1
            q_pieces = [Piece(0, cols * n, i * cols * n)]
            kv_pieces = ([Piece(0, rows * n, 0)] if cols == 1 else
                         [Piece(r * n, n, (r * cols + j) * n) for r in range(rows)])
            return q_pieces, kv_pieces
        # Query block i: the row's devices i·Pkv + c, c = 0 … Pkv − 1; key/value block j: the column's
        # devices i'·Pkv + j, i' = 0 … Pq − 1. A side gathered whole in natural order (swapped balance:
        # Pq = 1 for the queries, Pkv = 1 for the keys) is cut in half-chunks to match the other's pieces.
        q_pieces = (_zigzag_gathered_pieces([i * cols + c for c in range(cols)], n, devices) if zigzag[0]
                    else _natural_halves(devices, n))
        kv_pieces = (_zigzag_gathered_pieces([r * cols + j for r in range(rows)], n, devices) if zigzag[1]
                     else _natural_halves(devices, n))
        return q_pieces, kv_pieces

    def gather(q, k, v, q_ids, kv_ids):  # the row's queries, the column's keys and values
        q_ids, kv_ids = (None, None) if q_ids is None else (gather_q(q_ids, col_axis), gather_kv(kv_ids, row_axis))
        return gather_q(q, col_axis), gather_kv(k, row_axis), gather_kv(v, row_axis), q_ids, kv_ids

    def attend(q, k, v, q_ids, kv_ids):  # on the gathered blocks
        out, lse = _attend_pieces(q, k, v, q_ids, kv_ids, *pieces(), **blocks)
        # Merge the row's partials exactly: weights exp(lse_j − lse_row), lse_row = log Σ_j exp(lse_j).
        top = lax.pmax(lse, col_axis)  # only a shift for range
        top = jnp.where(jnp.isfinite(top), top, 0.0)  # rows no device can see: weight 0, not NaN
        weight = jnp.exp(lse - top)
        total = lax.psum(weight, col_axis)
        row_lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
        weight = weight / jnp.where(total > 0, total, 1.0)  # [b, heads, Pkv·n]
        weighted = (out.astype(jnp.float32) * jnp.swapaxes(weight, 1, 2)[..., None]).astype(q.dtype)
        # Sum over the row and keep this device's chunk of the query block; the terms travel in q's
        # dtype, like the gradients below (bfloat16: half the bytes of float32).
        return scatter_q(weighted, col_axis), row_lse

    def attend_backward(residuals, dout):  # gradients of the gathered blocks, not yet summed
        q, k, v, q_ids, kv_ids, out, row_lse = residuals
        return _attend_pieces_backward(q, k, v, q_ids, kv_ids, gather_q(out, col_axis), row_lse,
                                       gather_q(dout, col_axis), *pieces(), **blocks, dtype=q.dtype)

    if keep_gathered:  # autodiff transposes the gathers into the reduce-scatters
        q, k, v, q_ids, kv_ids = gather(q, k, v, *((None, None) if segment_ids is None else segment_ids))
        gathered_ids = None if q_ids is None else (q_ids, kv_ids)

        def backward(residuals, dout):
            return (*attend_backward(residuals, dout), None, None)

        return _keeping_own_chunk(attend, backward, q, k, v, gathered_ids)

    def forward(q, k, v, q_ids, kv_ids):
        return attend(*gather(q, k, v, q_ids, kv_ids))

    def backward(residuals, dout):
        *own, out, row_lse = residuals
        dq, dk, dv = attend_backward((*gather(*own), out, row_lse), dout)
        # sum the partial gradients (in q's dtype), keep this device's chunk
        return scatter_q(dq, col_axis), scatter_kv(dk, row_axis), scatter_kv(dv, row_axis), None, None

    return _keeping_own_chunk(forward, backward, q, k, v, segment_ids)


_STRATEGY_BODIES = {
    "allgather_kv": _allgather_kv,
    "ring": _ring,
    "ulysses": _ulysses,
    "attention2d": _attention2d,
    "usp": _usp,
    "double_ring": _double_ring,
}
