"""Depthwise long convolution over a sequence sharded across devices, with `shard_map`.

The global arrays are u: [batch, seq, channels] and k: [channels, kernel_len]; the sequence is split
over the mesh axes (seq_q, seq_kv) like attention's (row-major, P = Pq · Pkv chunks), every other
mesh axis shards the batch.

A long convolution mixes every position with every earlier one, but every channel on its own. So the
exact scheme is a transpose: an all-to-all turns the sequence-sharded [b, seq/P, channels] into a
channel-sharded [b, seq, channels/P] (device r gets channel chunk r of every position), each device
convolves its channels over the whole sequence with the single-device op (`longseq.ops.long_conv`:
the FFT, or a kernel), and a second all-to-all turns it back. k is sharded by channel the same way,
so no device holds another's kernels, and its gradient comes back sharded too.

Bytes each device receives per call: 2 · (P − 1)/P · seq/P · channels elements (one activation-sized
transfer each way, shrinking as 1/P), the Ulysses pattern applied to channels. Needs channels
divisible by P. Gradients come from autodiff through the all-to-alls (an all-to-all's transpose is
the reverse all-to-all).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from longseq.ops import long_conv as long_conv_op

Array = jax.Array


def _check(u, k, mesh: Mesh, seq_axes: tuple[str, str]) -> None:
    """Raise a ValueError naming the argument that does not fit the mesh."""
    for axis in seq_axes:
        if axis not in mesh.axis_names:
            raise ValueError(f"mesh: has no axis {axis!r} (axes {mesh.axis_names}); name the sequence axes "
                             "with seq_q_axis= / seq_kv_axis=, or give them size 1")
    if jnp.ndim(u) != 3:
        raise ValueError(f"u: expected [batch, seq, channels], got shape {jnp.shape(u)}")
    if jnp.ndim(k) != 2 or k.shape[0] != u.shape[2]:
        raise ValueError(f"k: expected [channels={u.shape[2]}, kernel_len], got shape {jnp.shape(k)}")
    devices = math.prod(mesh.shape[a] for a in seq_axes)
    batch, seq, channels = u.shape
    if seq % devices:
        raise ValueError(f"u: seq={seq} is not divisible by the {devices} devices of mesh axes {seq_axes}")
    if channels % devices:
        raise ValueError(f"u: channels={channels} is not divisible by the {devices} devices of mesh axes "
                         f"{seq_axes} (the sequence-parallel long convolution splits channels over them)")
    if batch % (mesh.size // devices):
        raise ValueError(f"u: batch={batch} is not divisible by the {mesh.size // devices} devices of the "
                         "other mesh axes")


def long_conv(u: Array, k: Array, *, mesh: Mesh, causal: bool = True, seq_q_axis: str = "seq_q",
              seq_kv_axis: str = "seq_kv", impl: str = "auto") -> Array:
    """`longseq.ops.long_conv` on a sequence-sharded input; differentiable.

    Args:
      u: [batch, seq, channels]; seq and channels divisible by the sequence devices Pq · Pkv.
      k: [channels, kernel_len], 1 <= kernel_len <= seq.
      mesh: a mesh with axes seq_q_axis and seq_kv_axis (either may have size 1); its other axes
        shard the batch.
      causal: linear (True) or circular (False) convolution, as in `ops.long_conv`.
      seq_q_axis, seq_kv_axis: the mesh axes the sequence is split over (config defaults).
      impl: the single-device implementation, as in `ops.long_conv`.

    Returns:
      y: [batch, seq, channels] in u's dtype, sharded like u.
    """
    seq_axes = (seq_q_axis, seq_kv_axis)
    _check(u, k, mesh, seq_axes)
    batch_axes = tuple(a for a in mesh.axis_names if a not in seq_axes) or None
    tokens = PartitionSpec(batch_axes, seq_axes, None)
    by_channel = PartitionSpec(seq_axes, None)

    def body(u, k):  # u [b, seq/P, channels], k [channels/P, kernel_len]
        whole = lax.all_to_all(u, seq_axes, split_axis=2, concat_axis=1, tiled=True)  # [b, seq, channels/P]
        y = long_conv_op(whole, k, causal=causal, impl=impl)
        return lax.all_to_all(y, seq_axes, split_axis=1, concat_axis=2, tiled=True)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(tokens, by_channel), out_specs=tokens, check_vma=False)
    return fn(u, k)
