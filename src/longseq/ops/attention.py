"""Scaled dot-product attention that also returns the log-sum-exp, plus the merge of partial results.

For a query i and the keys j it may see (its *visible* keys), with s = scale · q·k:

    s_ij   = scale · Σ_d q[i, d] · k[j, d]                (scale defaults to 1 / sqrt(head_dim))
    lse_i  = log Σ_{j visible} exp(s_ij)
    out_i  = Σ_{j visible} exp(s_ij − lse_i) · v[j]

Shapes:

    q:   [batch, q_len,  heads,    head_dim]
    k,v: [batch, kv_len, kv_heads, head_dim]      heads % kv_heads == 0
    out: [batch, q_len,  heads,    head_dim]      dtype of q
    lse: [batch, heads,  q_len]                   float32 (float64 for float64 inputs)

Grouped-query attention: with group = heads // kv_heads, query head h reads kv head h // group
(kv_heads == 1 is multi-query attention). K and V are never repeated in memory: q is viewed as
[batch, q_len, kv_heads, group, head_dim] and contracted against k directly.

Visibility. Key j is visible to query i when both hold:
  - causal=False, or kv_offset + j <= q_offset + i (positions are global, so a shard of queries
    can attend to a shard of keys held elsewhere; offsets may be traced int32 scalars);
  - segment_ids is None, or q_ids[b, i] == kv_ids[b, j] (packed sequences);
  - window is None, or the key is near: (q_offset + i) − (kv_offset + j) < window when causal
    (the query and the window − 1 keys before it), |(q_offset + i) − (kv_offset + j)| < window
    when not (sliding-window attention).

A query with NO visible key gets out = 0 and lse = -inf, and its gradient is exactly 0 (never NaN).
This is what makes partial results over blocks of keys composable: the lse is the log of the
softmax denominator, so `merge_partials` recombines blocks exactly, and a block that a query
cannot see contributes exp(-inf) = 0.

Scores and softmax are computed in float32 (float64 for float64 inputs) whatever the input dtype.

Implementations (`impl=`), all computing the function above:
  - "reference": dense jnp below, O(q_len · kv_len) memory; the ground truth for the others.
  - "pallas": the flash-attention Pallas kernels of `attention_pallas.py` (Triton on GPU; on TPU
    the Mosaic-tiled kernels of `attention_pallas_tpu.py`, which lower for TPU but have never run
    on one; interpret mode elsewhere, slow and meant for tests). Every feature, any platform.
  - "cudnn": cuDNN's fused flash kernels (GPU; bfloat16 / float16; head_dim a multiple of 8, at
    most 128; no segment ids), through `attention_cudnn.py`: float32 lse, any causal offsets (blocks
    cuDNN cannot mask run the Pallas kernel), and a backward from statistics. Its lse has no
    gradient: differentiating through it raises.
  - "pallas_mosaic_gpu": flash-attention kernels written for Hopper GPUs (H100 / H200) with Pallas
    Mosaic GPU (`attention_hopper.py`: TMA, wgmma, warp specialisation): bfloat16, head_dim 64 or
    128, every feature of "pallas". On an H200 0.94–1.11× cuDNN forward and 0.91–1.04×
    forward + backward (`longseq bench attention`, docs/attention.md). Elsewhere it raises, unless interpret=True (the Pallas
    GPU interpreter on CPU: slow, for tests).
  - "xla": `jax.nn.dot_product_attention(implementation="xla")`, for comparison. Its lse is NOT
    differentiable (JAX returns it with a stopped gradient) and rows with no visible key are not
    zeroed.
  - "auto": on GPUs "cudnn" where it applies (see above), else "pallas_mosaic_gpu" where it applies
    (segment ids on a Hopper GPU), else "pallas"; "reference" elsewhere (and for float64). cuDNN
    stays first while it measures faster. The choice is logged once per platform, dtype and reason.

The file reads: validation → reference implementation → merge_partials → the jax.nn wrappers →
public `attention`, which dispatches on `impl`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from longseq.config import FlashAttentionConfig
from longseq.ops import mosaic_gpu
from longseq.ops.attention_cudnn import cudnn_attention, cudnn_attention_backward, cudnn_supports

ATTENTION_IMPLS = ("auto", "pallas", "pallas_mosaic_gpu", "reference", "xla", "cudnn")

logger = logging.getLogger("longseq")

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Validation


def _check_offset(name: str, offset: Any) -> None:
    if jnp.ndim(offset) != 0 or not jnp.issubdtype(jnp.result_type(offset), jnp.integer):
        raise ValueError(f"{name}: expected an integer scalar, got {offset!r}")


def _check_attention_args(q, k, v, segment_ids, q_offset, kv_offset) -> None:
    """Raise a ValueError naming the first argument that does not fit the shapes documented above."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: expected rank 4 [batch, len, heads, head_dim], "
                             f"got shape {jnp.shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {k.shape}, got {v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected the dtype of q ({q.dtype}), got {k.dtype} and {v.dtype}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k: expected batch {batch} (from q), got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} (from q), got {k.shape[3]}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: expected kv_heads dividing heads={heads}, got kv_heads={kv_heads}")
    if segment_ids is not None:
        if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
            raise ValueError("segment_ids: expected None or a pair (q_ids, kv_ids), "
                             f"got {type(segment_ids).__name__}")
        expected = ((batch, q_len), (batch, k.shape[1]))
        for part, ids, shape in zip(("q_ids", "kv_ids"), segment_ids, expected):
            if jnp.shape(ids) != shape:
                raise ValueError(f"segment_ids: expected {part} of shape {shape}, got {jnp.shape(ids)}")
            if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
                raise ValueError(f"segment_ids: expected integer {part}, got {jnp.result_type(ids)}")
    _check_offset("q_offset", q_offset)
    _check_offset("kv_offset", kv_offset)


# ----------------------------------------------------------------------------------------------
# Reference implementation (plain jnp; the ground truth for the kernels)


def visibility_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids=None,
                    q_offset=0, kv_offset=0, window: int | None = None) -> Array | None:
    """Which keys each query sees: bool [batch or 1, q_len, kv_len], or None when all are visible.

    Built with jnp ops only, so q_offset / kv_offset may be traced scalars (e.g. derived from
    `jax.lax.axis_index` inside shard_map).
    """
    mask = None
    if causal or window is not None:
        q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)
        kv_pos = jnp.asarray(kv_offset, jnp.int32) + jnp.arange(kv_len, dtype=jnp.int32)
        distance = (q_pos[:, None] - kv_pos[None, :])[None]  # query position − key position
        if causal:
            mask = distance >= 0
        if window is not None:
            near = (distance < window) if causal else (jnp.abs(distance) < window)
            mask = near if mask is None else mask & near
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        same = jnp.asarray(q_ids)[:, :, None] == jnp.asarray(kv_ids)[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def _attention_reference(q, k, v, *, causal, segment_ids, scale, q_offset, kv_offset, window):
    """Dense masked softmax, O(q_len · kv_len) memory. Arguments already validated."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    acc = jnp.promote_types(q.dtype, jnp.float32)
    # HIGHEST: on GPU the default f32 matmul may use TF32; a reference must not.
    precision = jax.lax.Precision.HIGHEST

    # Query head h = kv_head * group + g, so this view pairs every query head with its kv head.
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, precision=precision, preferred_element_type=acc)
    s = s * jnp.asarray(scale, acc)

    mask = visibility_mask(q_len, kv_len, causal=causal, segment_ids=segment_ids,
                           q_offset=q_offset, kv_offset=kv_offset, window=window)
    if mask is not None:
        # -inf (not a large negative number) so hidden keys get weight exactly 0 even when a
        # row has no visible key at all; where's gradient sends nothing to the hidden scores.
        s = jnp.where(mask[:, None, None], s, -jnp.inf)

    # Subtracting the row max only keeps exp in range; softmax and lse are invariant to it, so
    # no gradient needs to flow through it. A row with no visible key has max -inf: shift by 0
    # instead, so that exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # Empty rows have denom 0. Dividing by a safe 1 there gives out = 0 with finite gradients;
    # the -inf lse is selected by where, so no gradient reaches log(0).
    visible = denom > 0
    safe_denom = jnp.where(visible, denom, 1.0)
    lse = jnp.where(visible, m + jnp.log(safe_denom), -jnp.inf)[..., 0]  # [b, kvh, g, q]

    out = jnp.einsum("bhgqk,bkhd->bqhgd", p / safe_denom, v.astype(acc), precision=precision)
    out = out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return out, lse.reshape(batch, heads, q_len)


def _attention_backward_reference(q, k, v, out, lse, dout, *, causal, segment_ids, scale, q_offset,
                                  kv_offset, window):
    """The flash-attention backward pass written densely: P from the given lse, delta from out."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    acc = jnp.promote_types(q.dtype, jnp.float32)
    precision = jax.lax.Precision.HIGHEST
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).astype(acc)
    dog = dout.reshape(batch, q_len, kv_heads, group, head_dim).astype(acc)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(acc), precision=precision) * jnp.asarray(scale, acc)
    lse = lse.astype(acc).reshape(batch, kv_heads, group, q_len)[..., None]
    mask = visibility_mask(q_len, kv_len, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                           kv_offset=kv_offset, window=window)
    visible = jnp.isfinite(lse) if mask is None else mask[:, None, None] & jnp.isfinite(lse)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)  # [b, kvh, g, q, k]
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(acc), dout.astype(acc))
    delta = delta.reshape(batch, kv_heads, group, q_len)[..., None]
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, dog, precision=precision)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, v.astype(acc), precision=precision)
    ds = p * (dp - delta) * jnp.asarray(scale, acc)
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(acc), precision=precision)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg, precision=precision)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# Merging partial results


def merge_partials(outs: Sequence[Array] | Array, lses: Sequence[Array] | Array) -> tuple[Array, Array]:
    """Exact attention over the union of disjoint key blocks, from each block's (out, lse).

    Args:
      outs: the blocks' outputs, either a sequence of arrays [batch, q_len, heads, head_dim] or one
        stacked array [parts, batch, q_len, heads, head_dim].
      lses: the blocks' log-sum-exps, a sequence of [batch, heads, q_len] or one stacked array
        [parts, batch, heads, q_len].

    Returns:
      (out, lse): out [batch, q_len, heads, head_dim] in the outs' dtype, lse [batch, heads, q_len]
      float32 (float64 for float64 inputs), with

          lse = log Σ_p exp(lse_p)        out = Σ_p exp(lse_p − lse) · out_p

      computed in float32. Blocks with lse_p = -inf (no visible key) get weight 0; rows where
      every block is -inf get out = 0 and lse = -inf, with zero (not NaN) gradients.
    """
    outs = jnp.stack(list(outs)) if isinstance(outs, (list, tuple)) else jnp.asarray(outs)
    lses = jnp.stack(list(lses)) if isinstance(lses, (list, tuple)) else jnp.asarray(lses)
    if outs.ndim != 5:
        raise ValueError("outs: expected [batch, q_len, heads, head_dim] per part "
                         f"(stacked: rank 5), got stacked shape {outs.shape}")
    parts, batch, q_len, heads, _ = outs.shape
    if parts == 0:
        raise ValueError("outs: expected at least one part, got none")
    if lses.shape != (parts, batch, heads, q_len):
        raise ValueError(f"lses: expected stacked shape {(parts, batch, heads, q_len)} "
                         f"(parts, batch, heads, q_len), got {lses.shape}")

    acc = jnp.promote_types(outs.dtype, jnp.float32)
    lses = lses.astype(acc)
    # Same guard as in the reference: shift by the max for range, but by 0 when all parts are -inf.
    m = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)  # [parts, b, h, q]; 0 for parts with lse -inf
    total = jnp.sum(w, axis=0)
    visible = total > 0
    safe_total = jnp.where(visible, total, 1.0)
    lse = jnp.where(visible, m + jnp.log(safe_total), -jnp.inf)

    weights = jnp.transpose(w / safe_total, (0, 1, 3, 2))[..., None]  # [parts, b, q, h, 1]
    out = jnp.sum(weights * outs.astype(acc), axis=0)
    return out.astype(outs.dtype), lse


# ----------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention (xla)


def _attention_xla(q, k, v, *, causal, segment_ids, scale, q_offset, kv_offset, window):
    mask = visibility_mask(q.shape[1], k.shape[1], causal=causal, segment_ids=segment_ids,
                           q_offset=q_offset, kv_offset=kv_offset, window=window)
    kwargs = dict(scale=scale, implementation="xla", return_residual=True)
    if mask is not None:
        kwargs["mask"] = mask[:, None]  # [batch or 1, 1, q_len, kv_len]
    out, lse = jax.nn.dot_product_attention(q, k, v, **kwargs)
    return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)  # [batch, q_len, heads] → [batch, heads, q_len]


# ----------------------------------------------------------------------------------------------
# Public entry point


_PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@functools.cache
def _log_auto_choice(platform: str, dtype: str, impl: str, reason: str | None) -> None:
    because = f" ({reason})" if reason else ""
    logger.info("attention impl='auto' uses %r for %s on platform %r%s", impl, dtype, platform, because)


def _resolve_impl(impl: str, q, segment_ids) -> str:
    """impl, with "auto" resolved for this platform, dtype, head_dim and segment ids."""
    if impl not in ATTENTION_IMPLS:
        expected = ", ".join(repr(name) for name in ATTENTION_IMPLS)
        raise ValueError(f"impl: expected one of {expected}, got {impl!r}")
    if impl != "auto":
        return impl
    platform, dtype, reason = jax.default_backend(), jnp.dtype(q.dtype).name, None
    if platform != "gpu" or dtype not in ("float32", "bfloat16", "float16"):
        resolved = "reference"
    else:
        reason = cudnn_supports(q.dtype, q.shape[-1], segment_ids)
        resolved = "cudnn"
        if reason:
            from longseq.ops.attention_hopper import supports

            hopper = mosaic_gpu.on_hopper() and supports(q.dtype, q.shape[-1]) is None
            resolved = "pallas_mosaic_gpu" if hopper else "pallas"
    _log_auto_choice(platform, dtype, resolved, reason)
    return resolved


def _pallas_functions(flash, interpret):
    """The Pallas forward and backward-from-statistics, their tiling and mode bound."""
    from longseq.ops.attention_pallas import flash_attention, flash_attention_backward

    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    bound = dict(flash=flash or FlashAttentionConfig(), interpret=interpret)
    return functools.partial(flash_attention, **bound), functools.partial(flash_attention_backward, **bound)


def _hopper_functions(q, interpret):
    """The Hopper kernels' forward and backward-from-statistics, after checking they can run here."""
    from longseq.ops.attention_hopper import hopper_attention, hopper_attention_backward, supports

    reason = supports(q.dtype, q.shape[-1])
    if reason:
        raise ValueError(f"q: {reason}; use impl='pallas'")
    if not interpret and not mosaic_gpu.on_hopper():
        device = jax.devices()[0]
        raise ValueError(f"impl: 'pallas_mosaic_gpu' runs on Hopper GPUs (compute capability 9.x), not on "
                         f"{device.platform} {device.device_kind!r}; use impl='pallas' (any platform), or "
                         "interpret=True to run it in the Pallas GPU interpreter (slow: for tests)")
    bound = dict(interpret=bool(interpret))
    return functools.partial(hopper_attention, **bound), functools.partial(hopper_attention_backward, **bound)


def _check_cudnn(q, segment_ids) -> None:
    reason = cudnn_supports(q.dtype, q.shape[-1], segment_ids)
    if reason:
        name = "segment_ids" if segment_ids is not None else "q"
        raise ValueError(f"{name}: {reason}; use impl='pallas'")


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids=None,
              scale: float | None = None, q_offset=0, kv_offset=0, window: int | None = None,
              impl: str = "auto", flash: FlashAttentionConfig | None = None,
              interpret: bool | None = None) -> tuple[Array, Array]:
    """Masked scaled dot-product attention returning (out, lse).

    Args:
      q: [batch, q_len, heads, head_dim] queries.
      k: [batch, kv_len, kv_heads, head_dim] keys, same dtype as q; heads % kv_heads == 0.
      v: [batch, kv_len, kv_heads, head_dim] values, same shape and dtype as k.
      causal: key at global position kv_offset + j is visible to the query at global position
        q_offset + i only if kv_offset + j <= q_offset + i.
      segment_ids: None, or a pair (q_ids [batch, q_len], kv_ids [batch, kv_len]) of integers; a
        query sees only keys with the same id. Combines with causal.
      scale: multiplies q·k; default 1 / sqrt(head_dim).
      q_offset, kv_offset: global positions of q[:, 0] and k[:, 0] (Python ints or traced int32
        scalars); used by causal and window.
      window: None, or a positive int: sliding-window attention (see the module docstring).
      impl: one of ATTENTION_IMPLS (see the module docstring).
      flash: tiling of the Pallas kernel (impl="pallas"); default FlashAttentionConfig().
      interpret: run the Pallas kernels in interpret mode; default: unless on a GPU or TPU
        ("pallas_mosaic_gpu": only when True).

    Returns:
      out: [batch, q_len, heads, head_dim] in q's dtype.
      lse: [batch, heads, q_len] float32 (float64 for float64 inputs), the log of the softmax
        denominator. Rows with no visible key have out = 0, lse = -inf and zero gradient.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_attention_args(q, k, v, segment_ids, q_offset, kv_offset)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window: expected None or a positive int, got {window!r}")
    name = _resolve_impl(impl, q, segment_ids)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    common = dict(causal=causal, segment_ids=segment_ids, scale=scale, q_offset=q_offset,
                  kv_offset=kv_offset, window=window)
    if name == "reference":
        return _attention_reference(q, k, v, **common)
    if name == "xla":
        return _attention_xla(q, k, v, **common)
    if name == "pallas_mosaic_gpu":
        return _hopper_functions(q, interpret)[0](q, k, v, **common)
    if name == "cudnn":
        _check_cudnn(q, segment_ids)
    elif q.dtype not in _PALLAS_DTYPES:
        raise ValueError(f"q: impl='pallas' takes float32, bfloat16 or float16, got {q.dtype}")
    forward, backward = _pallas_functions(flash, interpret)
    if name == "cudnn":
        del common["segment_ids"]
        return cudnn_attention(q, k, v, partial=functools.partial(forward, segment_ids=None),
                               partial_backward=functools.partial(backward, segment_ids=None), **common)
    return forward(q, k, v, **common)


def attention_backward(q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, *,
                       causal: bool = False, segment_ids=None, scale: float | None = None, q_offset=0,
                       kv_offset=0, window: int | None = None, impl: str = "auto",
                       flash: FlashAttentionConfig | None = None,
                       interpret: bool | None = None) -> tuple[Array, Array, Array]:
    """The flash-attention backward pass from saved statistics: (dq, dk, dv) of one key block.

    With the (out, lse) that `attention` returned for these q, k, v, this is the vjp of `attention`
    with cotangents (dout, 0). With the out and lse of the rows merged over several disjoint key
    blocks (as ring attention holds them), it is this block's share of the merged attention's
    gradient: the probabilities exp(s − lse) are the merged ones, so dk, dv are the block's
    gradients and dq summed over the blocks is the query gradient. Nothing of size q_len × kv_len is
    saved between the forward and this call.

    Args:
      q, k, v, causal, segment_ids, scale, q_offset, kv_offset, window, flash, interpret: as in
        `attention`.
      out: [batch, q_len, heads, head_dim] the rows' attention output; lse: [batch, heads, q_len]
        their log-sum-exp (-inf for rows that see no key: zero gradient).
      dout: [batch, q_len, heads, head_dim] the cotangent of out.
      impl: "pallas", "pallas_mosaic_gpu", "cudnn", "reference" or "auto" (resolved as in `attention`);
        "xla" keeps its statistics to itself and is refused.

    Returns:
      dq [batch, q_len, heads, head_dim], dk and dv [batch, kv_len, kv_heads, head_dim], in the
      dtypes of q, k, v.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_attention_args(q, k, v, segment_ids, q_offset, kv_offset)
    for name, x, shape in (("out", out, q.shape), ("dout", dout, q.shape),
                           ("lse", lse, (q.shape[0], q.shape[2], q.shape[1]))):
        if jnp.shape(x) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {jnp.shape(x)}")
    name = _resolve_impl(impl, q, segment_ids)
    if name == "xla":
        raise ValueError("impl: attention_backward runs 'pallas', 'pallas_mosaic_gpu', 'cudnn' or 'reference' "
                         f"(or 'auto'), got {impl!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    common = dict(causal=causal, segment_ids=segment_ids, scale=scale, q_offset=q_offset,
                  kv_offset=kv_offset, window=window)
    if name == "reference":
        return _attention_backward_reference(q, k, v, out, lse, dout, **common)
    if name == "pallas_mosaic_gpu":
        return _hopper_functions(q, interpret)[1](q, k, v, out, lse, dout, **common)
    _, backward = _pallas_functions(flash, interpret)
    if name == "cudnn":
        _check_cudnn(q, segment_ids)
        del common["segment_ids"]
        return cudnn_attention_backward(q, k, v, out, lse, dout,
                                        partial_backward=functools.partial(backward, segment_ids=None),
                                        **common)
    return backward(q, k, v, out, lse, dout, **common)
