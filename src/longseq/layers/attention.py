"""Multi-head self-attention with grouped-query heads and rotary positions, over `longseq.ops.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longseq.config import FlashAttentionConfig
from longseq.ops import attention as attention_op
from longseq.parallel import SequenceParallel
from longseq.parallel.fsdp import constrain_to_batch
from longseq.layers.rotary import apply_rotary


class Attention(nnx.Module):
    """Self-attention: projections (no biases) → RoPE on q, k → `ops.attention` → output projection.

    Grouped-query attention: `num_kv_heads` key/value heads, each shared by
    num_heads // num_kv_heads query heads. K and V are projected to num_kv_heads heads only and
    handed to the op un-repeated (the op groups the query heads itself).

    Mixed precision: parameters are float32, projections run in `dtype`; the op computes scores and
    softmax in float32 whatever `dtype` is.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, *,
                 causal: bool, rope_theta: float = 10000.0, window: int | None = None,
                 dtype: jnp.dtype = jnp.float32, impl: str = "auto",
                 flash: FlashAttentionConfig | None = None,
                 sequence_parallel: SequenceParallel | None = None, rngs: nnx.Rngs):
        """
        Args:
          d_model: input and output width; head_dim = d_model // num_heads (must be even).
          num_heads: query heads.
          num_kv_heads: key/value heads, dividing num_heads (None = num_heads).
          causal: position i attends to positions <= i only (decoder) or to all (encoder).
          rope_theta: rotary base.
          window: sliding-window attention width (None = every position), see `ops.attention`.
          dtype: compute dtype of the projections and of the op inputs.
          impl: `KernelsConfig.attention`, forwarded to the op.
          flash: tiling of the Pallas kernel (`KernelsConfig.flash_attention`), forwarded to the op.
          sequence_parallel: run the op sequence-parallel (`longseq.parallel`) on this plan's mesh;
            None = the single-device op.
          rngs: needs a `params` stream (or a default one).
        """
        num_kv_heads = num_kv_heads or num_heads
        if d_model % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} and be divisible by "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.rope_theta = rope_theta
        self.window = window
        self.impl = impl
        self.flash = flash
        self.sequence_parallel = sequence_parallel
        linear = lambda d_in, d_out: nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, rngs=rngs)
        self.q_proj = linear(d_model, num_heads * self.head_dim)
        self.kv_proj = linear(d_model, 2 * num_kv_heads * self.head_dim)
        self.out_proj = linear(num_heads * self.head_dim, d_model)

    def __call__(self, x: jax.Array, *, segment_ids: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """
        Args:
          x: [batch, seq, d_model].
          segment_ids: optional (q_ids [batch, seq], kv_ids [batch, seq]) ints: position i sees j
            only if their ids are equal (packed sequences). Positions do not restart per segment.
          positions: rotary positions, [seq] or [batch, seq] (None = 0 .. seq−1).

        Returns:
          [batch, seq, d_model] in the compute dtype.
        """
        batch, seq, _ = x.shape
        if positions is None:
            positions = jnp.arange(seq)
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k, v = jnp.split(self.kv_proj(x), 2, axis=-1)
        k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, positions, theta=self.rope_theta)
        k = apply_rotary(k, positions, theta=self.rope_theta)
        q, k, v = (checkpoint_name(x, "attention_qkv") for x in (q, k, v))  # see longseq.layers.remat
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.attention(q, k, v, causal=self.causal, segment_ids=segment_ids,
                                                   window=self.window, impl=self.impl, flash=self.flash)
        else:  # split as the batch, alike (under FSDP; cuDNN's partitioner needs it), then the op on globals
            q, k, v = (constrain_to_batch(x) for x in (q, k, v))
            out, _ = attention_op(q, k, v, causal=self.causal, segment_ids=segment_ids, window=self.window,
                                  impl=self.impl, flash=self.flash)
        out = checkpoint_name(out, "attention_out")
        return self.out_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
