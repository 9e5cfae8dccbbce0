"""Attention through cuDNN's fused flash kernels (GPU; bfloat16 / float16), with what sequence
parallelism needs from a per-block kernel: the log-sum-exp in float32, a backward pass from given
statistics, and causal masking between blocks that sit at global offsets.

cuDNN masks causally only along a block's own diagonal. Causal attention between a query block at
q_offset and a key block at kv_offset is one of four block kinds:

    FULL      every key precedes (or equals) every query: no mask
    DIAGONAL  the same positions (square block, equal offsets): cuDNN's causal mask
    HIDDEN    every key follows every query: out 0, lse -inf, zero gradients; nothing is launched
    PARTIAL   anything else, e.g. a query block against a longer prefix of keys: the Pallas kernel

Non-causal blocks are FULL. Sliding windows go to cuDNN only on DIAGONAL blocks (cuDNN's window is
relative to the diagonal); windowed blocks of other kinds are PARTIAL. With Python-int offsets the
kind is decided while tracing; with traced offsets (e.g. from `lax.axis_index` in shard_map) a
`lax.switch` picks the branch on the device. Ring attention and ATTENTION2D only form
FULL / DIAGONAL / HIDDEN blocks, so there every block runs on cuDNN.

Where cuDNN is called from. The forward is `jax._src.cudnn.fused_attention_stablehlo.
dot_product_attention(..., return_residual=True)`, whose statistics are float32 (the public
`jax.nn.dot_product_attention` rounds them to the input dtype, too coarse to merge blocks). The
backward from statistics binds JAX's cuDNN backward primitive, which takes the forward's output and
softmax statistics as operands: JAX has no public function for it. Both private names are used
only in `_cudnn_forward` and `_cudnn_backward` below; they are the same in jax 0.10 and 0.11.

Shapes as in `longseq.ops.attention`: q [batch, q_len, heads, head_dim], k and v [batch, kv_len,
kv_heads, head_dim], lse [batch, heads, q_len] float32.

The lse that `cudnn_attention` returns has no gradient: differentiating through it raises (the
Pallas kernel has one; `impl="pallas"`). Its out has the exact gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FULL, DIAGONAL, HIDDEN, PARTIAL = 0, 1, 2, 3
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supports(dtype, head_dim: int, segment_ids) -> str | None:
    """None if cuDNN runs these blocks, else the reason it does not (for errors and for "auto")."""
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in CUDNN_DTYPES]:
        return f"impl='cudnn' takes bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 128:
        return f"impl='cudnn' takes head_dim a multiple of 8 and at most 128, got {head_dim}"
    if segment_ids is not None:
        return "impl='cudnn' does not take segment ids"
    return None


def _static(x) -> bool:
    return isinstance(x, (int, np.integer))


def block_kind(q_len: int, kv_len: int, q_offset, kv_offset, *, causal: bool, window: int | None):
    """FULL, DIAGONAL, HIDDEN or PARTIAL (see the module docstring): a Python int when the offsets
    are Python ints, else a traced int32 scalar."""
    if not causal:
        return FULL if window is None else PARTIAL
    if _static(q_offset) and _static(kv_offset):
        q_offset, kv_offset = int(q_offset), int(kv_offset)
        if kv_offset > q_offset + q_len - 1:
            return HIDDEN
        if q_len == kv_len and q_offset == kv_offset:
            return DIAGONAL
        if kv_offset + kv_len - 1 <= q_offset and window is None:
            return FULL
        return PARTIAL
    q_offset, kv_offset = jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32)
    hidden = kv_offset > q_offset + q_len - 1
    diagonal = (q_offset == kv_offset) if q_len == kv_len else jnp.bool_(False)
    full = (kv_offset + kv_len - 1 <= q_offset) if window is None else jnp.bool_(False)
    return jnp.where(hidden, HIDDEN, jnp.where(diagonal, DIAGONAL, jnp.where(full, FULL, PARTIAL)))


# ----------------------------------------------------------------------------------------------
# The two cuDNN calls (the only place that names JAX's cuDNN binding)


def _cudnn_forward(q, k, v, *, scale: float, causal: bool, window: int | None):
    """cuDNN flash attention on one block, masked along its diagonal when causal: (out, lse)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    out, lse = cudnn.dot_product_attention(q, k, v, scale=scale, mask_type=mask, qkv_layout="BTNH",
                                           sliding_window_length=window, return_residual=True)
    return out, lse.astype(jnp.float32)  # [batch, heads, q_len]


def _cudnn_backward(q, k, v, out, lse, dout, *, scale: float, causal: bool, window: int | None):
    """cuDNN's flash backward on one block, from the given (out, lse): (dq, dk, dv)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    unused = jnp.zeros(0, q.dtype)  # bias, sequence lengths, offsets, page tables: none
    mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    dq, dk, dv = cudnn._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused, unused, unused, unused, unused, unused,
        lse.astype(jnp.float32), out.astype(q.dtype), dout.astype(q.dtype),
        scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask,
        layout=cudnn.AttentionLayout.BTNH.value, sliding_window_length=window)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# One block of any kind, forward and backward from statistics


def _forward_of_kind(kind, q, k, v, *, scale, causal, window, q_offset, kv_offset, partial):
    def full(_):
        return _cudnn_forward(q, k, v, scale=scale, causal=False, window=None)

    def diagonal(_):
        return _cudnn_forward(q, k, v, scale=scale, causal=True, window=window)

    def hidden(_):
        batch, q_len, heads, head_dim = q.shape
        return (jnp.zeros(q.shape, q.dtype), jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32))

    def general(_):
        return partial(q, k, v, causal=causal, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                       window=window)

    branches = (full, diagonal, hidden, general)
    if isinstance(kind, int):
        return branches[kind](None)
    return jax.lax.switch(kind, branches, None)


def _backward_of_kind(kind, q, k, v, out, lse, dout, *, scale, causal, window, q_offset, kv_offset,
                      partial_backward):
    def full(_):
        return _cudnn_backward(q, k, v, out, lse, dout, scale=scale, causal=False, window=None)

    def diagonal(_):
        return _cudnn_backward(q, k, v, out, lse, dout, scale=scale, causal=True, window=window)

    def hidden(_):
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

    def general(_):
        return partial_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, q_offset=q_offset,
                                kv_offset=kv_offset, window=window)

    branches = (full, diagonal, hidden, general)
    if isinstance(kind, int):
        return branches[kind](None)
    return jax.lax.switch(kind, branches, None)


def cudnn_attention_backward(q, k, v, out, lse, dout, *, causal: bool, scale: float, q_offset: Any = 0,
                             kv_offset: Any = 0, window: int | None = None, partial_backward):
    """(dq, dk, dv) of one block from the rows' (out, lse), as `ops.attention_backward`.

    partial_backward: the backward from statistics for PARTIAL blocks (the Pallas one), called
      with the same arguments and keywords causal, scale, q_offset, kv_offset, window.
    """
    kind = block_kind(q.shape[1], k.shape[1], q_offset, kv_offset, causal=causal, window=window)
    return _backward_of_kind(kind, q, k, v, out, lse, dout, scale=scale, causal=causal, window=window,
                             q_offset=q_offset, kv_offset=kv_offset, partial_backward=partial_backward)


def cudnn_attention(q, k, v, *, causal: bool, scale: float, q_offset: Any = 0, kv_offset: Any = 0,
                    window: int | None = None, partial, partial_backward) -> tuple[Array, Array]:
    """(out, lse) of one block, as `ops.attention`, differentiable in out (not in lse).

    partial / partial_backward: forward (returning (out, lse)) and backward from statistics for
      PARTIAL blocks, called with keywords causal, scale, q_offset, kv_offset, window.
    """
    static = _static(q_offset) and _static(kv_offset)  # then the kind is known now, and no switch is built
    blocks = dict(scale=scale, causal=causal, window=window)

    def kind_and_offsets(traced_q_offset, traced_kv_offset):
        offsets = (q_offset, kv_offset) if static else (traced_q_offset, traced_kv_offset)
        kind = block_kind(q.shape[1], k.shape[1], *offsets, causal=causal, window=window)
        return kind, dict(q_offset=offsets[0], kv_offset=offsets[1])

    @jax.custom_vjp
    def attend(q, k, v, q_offset, kv_offset):
        kind, offsets = kind_and_offsets(q_offset, kv_offset)
        return _forward_of_kind(kind, q, k, v, partial=partial, **offsets, **blocks)

    def attend_forward(q, k, v, q_offset, kv_offset):  # symbolic_zeros=True: primals come wrapped
        q, k, v, q_offset, kv_offset = (x.value for x in (q, k, v, q_offset, kv_offset))
        out, lse = attend(q, k, v, q_offset, kv_offset)
        return (out, lse), (q, k, v, q_offset, kv_offset, out, lse)

    def attend_backward(residuals, cotangents):
        q, k, v, q_offset, kv_offset, out, lse = residuals
        dout, dlse = cotangents
        if not isinstance(dlse, jax.custom_derivatives.SymbolicZero):
            raise ValueError("lse: impl='cudnn' gives the log-sum-exp no gradient, and this computation "
                             "differentiates through it; use impl='pallas'")
        if isinstance(dout, jax.custom_derivatives.SymbolicZero):
            dout = jnp.zeros(out.shape, out.dtype)
        kind, offsets = kind_and_offsets(q_offset, kv_offset)
        dq, dk, dv = _backward_of_kind(kind, q, k, v, out, lse, dout, partial_backward=partial_backward,
                                       **offsets, **blocks)
        return dq, dk, dv, None, None

    attend.defvjp(attend_forward, attend_backward, symbolic_zeros=True)
    traced = [jnp.asarray(x, jnp.int32) for x in (q_offset, kv_offset)]
    return attend(q, k, v, *traced)
