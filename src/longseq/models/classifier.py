"""Sequence classifier: bidirectional backbone, masked mean pooling, linear head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longseq.config import KernelsConfig, ModelConfig
from longseq.layers.remat import Remat
from longseq.models.backbone import Backbone
from longseq.parallel import SequenceParallel


def masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of h over the positions where mask is 1.

    Args:
      h: [batch, seq, features].
      mask: [batch, seq], 1 = real token, 0 = padding.

    Returns:
      [batch, features] float32 (zeros for a row with no real token).
    """
    mask = mask.astype(jnp.float32)
    total = jnp.einsum("blf,bl->bf", h.astype(jnp.float32), mask)
    return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


class SequenceClassifier(nnx.Module):
    """tokens → Backbone(bidirectional, padding masked) → masked mean → linear → class logits.

    Padding is inert: padded positions are zeroed in the residual stream before and after every
    block, attention layers only attend within the same mask value (segment ids = mask), and the
    bidirectional convolutions are linear in both directions (no wrap-around) and bias-free, so
    the logits do not depend on the tokens at padded positions, nor, for padding at the end, on
    the number of padding positions (see `Backbone.__call__` for the one proviso, gated_conv's
    short convolution).
    """

    def __init__(self, config: ModelConfig, kernels: KernelsConfig, *, vocab_size: int, num_classes: int,
                 seq_len: int, rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None,
                 remat: Remat = Remat()):
        """
        Args:
          config: the model section.
          kernels: op implementations.
          vocab_size: token ids are in [0, vocab_size).
          num_classes: outputs of the head.
          seq_len: the longest sequence (the long-convolution kernel length).
          rngs: `params` stream; and `dropout` if any dropout rate is > 0.
          sequence_parallel: run the mixers sequence-parallel on this mesh plan (None = one device's op).
          remat: what each block keeps for the backward pass (`longseq.layers.remat`).
        """
        self.backbone = Backbone(config, kernels, vocab_size=vocab_size, seq_len=seq_len, causal=False,
                                 rngs=rngs, sequence_parallel=sequence_parallel, remat=remat)
        self.head = nnx.Linear(config.d_model, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, mask: jax.Array) -> jax.Array:
        """
        Args:
          tokens: [batch, seq] int32.
          mask: [batch, seq] float32, 1 = real token, 0 = padding.

        Returns:
          logits [batch, num_classes] float32.
        """
        ids = (mask > 0).astype(jnp.int32)
        h = self.backbone(tokens, segment_ids=(ids, ids), mask=mask)
        return self.head(masked_mean(h, mask))
