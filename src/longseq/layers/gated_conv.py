"""Gated convolution of order 2, the H3 / Hyena form with explicit long-convolution kernels.

    q, k, v = split(W_in x)                           [batch, seq, d_model] each
    q, k, v = short_conv(q, k, v)                     depthwise, width short_conv_width
    y       = W_out (q ⊙ LongConv(k ⊙ v))

This is H3's Q ⊙ SSM(shift(K) ⊙ V) (Fu et al. 2023, "Hungry Hungry Hippos") with the short
convolution playing the shift SSM and an explicit long kernel replacing the diagonal SSM, which is
how "Simple Hardware-Efficient Long Convolutions" (Fu et al. 2023) runs H3 with long convolutions;
equivalently the order-2 Hyena operator (Poli et al. 2023), y = x0 ⊙ (h * (x1 ⊙ v)), with an
explicit kernel h instead of an implicit (MLP-generated) one.

Causal layers pad the short convolution on the left and use a causal long convolution;
bidirectional ones (causal=False) centre the short convolution ('same' padding) and use the
two-kernel bidirectional `LongConv` (a forward kernel over the past, a backward kernel over the
future, both linear: no wrap-around).

No part has a bias (W_in, W_out, the short convolution, as H3's shift SSM; the long convolution's
skip D is multiplicative), so zero input rows give zero q, k, v and add nothing to the other
positions. The one reach across a boundary is the short convolution's: a bidirectional layer's
centred window carries the last real rows width//2 positions into trailing zero padding (a causal
one (width − 1) positions past its end), and those positions' k ⊙ v then enter the long
convolution. That depends only on the real rows, not on the padded ones nor on how many padding
positions follow, as long as the padding is at least that long.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longseq.layers.long_conv import LongConv
from longseq.parallel import SequenceParallel


def short_conv(x: jax.Array, weight: jax.Array, *, causal: bool) -> jax.Array:
    """Depthwise convolution with a short kernel, zero-padded to the input length; no bias.

    Causal: y[t] = Σ_j w[j] · x[t − (width−1) + j]  (taps t−width+1 .. t).
    Centred: y[t] = Σ_j w[j] · x[t − width//2 + j]  (taps t−width//2 .. t+(width−1)//2).

    Args:
      x: [batch, seq, channels].
      weight: [width, channels].

    Returns:
      [batch, seq, channels] in x's dtype.
    """
    width = weight.shape[0]
    left = width - 1 if causal else width // 2
    padded = jnp.pad(x, ((0, 0), (left, width - 1 - left), (0, 0)))
    seq = x.shape[1]
    return sum(padded[:, j:j + seq] * weight[j] for j in range(width))


class ShortConv(nnx.Module):
    """Depthwise short convolution without bias (see `short_conv`), the role of H3's shift SSM.

    Parameter: `weight` Param [width, channels]. Zero input gives zero output.
    """

    def __init__(self, channels: int, width: int, *, causal: bool, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        """
        Args:
          channels: channels convolved independently.
          width: taps per channel.
          causal: left padding (True) or centred 'same' padding (False).
          dtype: compute dtype.
          rngs: needs a `params` stream.
        """
        self.causal = causal
        self.dtype = dtype
        self.weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (width, channels)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, channels] -> [batch, seq, channels] in the compute dtype."""
        return short_conv(x.astype(self.dtype), self.weight[...].astype(self.dtype), causal=self.causal)


class GatedConv(nnx.Module):
    """y = W_out (q ⊙ LongConv(k ⊙ v)) with q, k, v from a projection and a short convolution.

    Parameters: `in_proj`, `short_conv`, `long_conv` (a `LongConv`: one kernel, or two when
    bidirectional), `out_proj`; none has a bias.
    """

    def __init__(self, d_model: int, seq_len: int, *, causal: bool, short_conv_width: int = 3,
                 squash_lambda: float = 0.0, smooth_width: int = 1, kernel_dropout: float = 0.0,
                 learned_butterfly: bool = False, dtype: jnp.dtype = jnp.float32, impl: str = "auto",
                 sequence_parallel: SequenceParallel | None = None, rngs: nnx.Rngs):
        """
        Args:
          d_model: input and output width, and the channels of the long convolution.
          seq_len: kernel length of the long convolution (see `LongConv`).
          causal: causal (decoder) or bidirectional (encoder) mixing.
          short_conv_width: taps of the short depthwise convolution.
          squash_lambda, smooth_width, kernel_dropout: the long-convolution regularisers.
          learned_butterfly: learn the long convolution's DFT factors (see `LongConv`).
          dtype: compute dtype.
          impl: `KernelsConfig.long_conv`.
          sequence_parallel: run the long convolution sequence-parallel on this plan's mesh
            (None = one device's op).
          rngs: `params` stream; and `dropout` if kernel_dropout > 0.
        """
        self.in_proj = nnx.Linear(d_model, 3 * d_model, use_bias=False, dtype=dtype, rngs=rngs)
        self.short_conv = ShortConv(3 * d_model, short_conv_width, causal=causal, dtype=dtype, rngs=rngs)
        self.long_conv = LongConv(d_model, seq_len, causal=causal, squash_lambda=squash_lambda,
                                  smooth_width=smooth_width, kernel_dropout=kernel_dropout,
                                  learned_butterfly=learned_butterfly, dtype=dtype, impl=impl,
                                  sequence_parallel=sequence_parallel, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model] in the compute dtype."""
        q, k, v = jnp.split(self.short_conv(self.in_proj(x)), 3, axis=-1)
        return self.out_proj(self.long_conv(k * v, gate=q))
