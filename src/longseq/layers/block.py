"""The pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longseq.config import KernelsConfig, ModelConfig
from longseq.layers.attention import Attention
from longseq.layers.gated_conv import GatedConv
from longseq.layers.long_conv import LongConvMixer
from longseq.layers.mlp import SwiGLU
from longseq.layers.norm import RMSNorm
from longseq.layers.remat import in_position_blocks
from longseq.parallel import SequenceParallel

MIXERS = ("attention", "long_conv", "gated_conv")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    """ModelConfig.compute_dtype as a jnp dtype."""
    return _DTYPES[config.compute_dtype]


def make_mixer(name: str, config: ModelConfig, kernels: KernelsConfig, *, seq_len: int, causal: bool,
               rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None) -> nnx.Module:
    """The sequence mixer called `name` (one of MIXERS), built from the config.

    Every mixer maps [batch, seq, d_model] -> [batch, seq, d_model] in the compute dtype.
    """
    dtype = compute_dtype(config)
    conv = config.long_conv
    kernel_len = conv.kernel_len or seq_len  # the convolution layers' kernel length
    conv_options = dict(squash_lambda=conv.squash_lambda, smooth_width=conv.smooth_width,
                        kernel_dropout=conv.kernel_dropout, learned_butterfly=conv.learned_butterfly)
    if name == "attention":
        return Attention(config.d_model, config.num_heads, config.num_kv_heads, causal=causal,
                         rope_theta=config.rope_theta, window=config.attention_window, dtype=dtype,
                         impl=kernels.attention, flash=kernels.flash_attention,
                         sequence_parallel=sequence_parallel, rngs=rngs)
    if name == "long_conv":
        return LongConvMixer(config.d_model, kernel_len, causal=causal, dtype=dtype, impl=kernels.long_conv,
                             sequence_parallel=sequence_parallel, rngs=rngs, **conv_options)
    if name == "gated_conv":
        return GatedConv(config.d_model, kernel_len, causal=causal, short_conv_width=conv.short_conv_width,
                         dtype=dtype, impl=kernels.long_conv, sequence_parallel=sequence_parallel, rngs=rngs,
                         **conv_options)
    raise ValueError(f"mixer: expected one of {', '.join(MIXERS)}, got {name!r}")


class Block(nnx.Module):
    """Pre-norm residual block with dropout on both branches:

        x = x + dropout(mixer(norm1(x)))
        x = x + dropout(mlp(norm2(x)))

    The residual stream keeps the dtype it comes in (float32 in the models); the branches compute
    in the config's compute dtype and are cast back before the addition.
    """

    def __init__(self, config: ModelConfig, kernels: KernelsConfig, *, mixer: str, seq_len: int,
                 causal: bool, rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None):
        """
        Args:
          config: the model section (d_model, heads, mlp_hidden, dropout, dtype, long_conv options).
          kernels: op implementations.
          mixer: "attention" | "long_conv" | "gated_conv".
          seq_len: the longest sequence (the long-convolution kernel length).
          causal: causal (decoder) or bidirectional (encoder) mixing.
          rngs: `params` stream; and `dropout` if config.dropout or kernel_dropout > 0.
          sequence_parallel: run the mixer sequence-parallel on this mesh plan (None = one device's op).
        """
        dtype = compute_dtype(config)
        self.mixer_name = mixer
        self.mixer_norm = RMSNorm(config.d_model, dtype=dtype)
        self.mixer = make_mixer(mixer, config, kernels, seq_len=seq_len, causal=causal, rngs=rngs,
                                sequence_parallel=sequence_parallel)
        self.mlp_norm = RMSNorm(config.d_model, dtype=dtype)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs if config.dropout > 0 else None)

    def __call__(self, x: jax.Array, *, segment_ids: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None, mlp_chunk: int | None = None) -> jax.Array:
        """
        Args:
          x: [batch, seq, d_model] residual stream.
          segment_ids: (q_ids, kv_ids) [batch, seq] each, for attention mixers; convolution mixers
            ignore them (they mix across segment boundaries).
          positions: [seq] rotary positions of the rows, for attention mixers (None = 0 .. seq−1).
          mlp_chunk: run the MLP (and its norm) this many positions at a time, recomputing each block
            in the backward pass (`longseq.layers.remat.in_position_blocks`); None = all at once.

        Returns:
          [batch, seq, d_model] in x's dtype.
        """
        h = self.mixer_norm(x)
        if self.mixer_name == "attention":
            h = self.mixer(h, segment_ids=segment_ids, positions=positions)
        else:
            h = self.mixer(h)
        x = x + self.dropout(h).astype(x.dtype)
        h = in_position_blocks(lambda x: self.mlp(self.mlp_norm(x)), x, mlp_chunk)
        return x + self.dropout(h).astype(x.dtype)
