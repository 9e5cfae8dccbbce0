"""Long convolutions (Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions for Sequence
Modeling"): every channel owns an explicit kernel as long as the sequence, kept smooth and sparse
by two regularisers applied in the forward pass instead of by a parameterisation (as S4 does).

Effective kernel, from a learned parameter `kernel` [channels, seq_len]:

    k = smooth(kernel, smooth_width)          average pool along the taps ('same' length; off at 1)
    k = squash(k, squash_lambda)              soft-threshold sign(k)·max(|k| − λ, 0) (off at 0)
    k = dropout(k, kernel_dropout)            on the kernel weights, training only

(the order of the paper's reference code: smoothing first, so the squash leaves exact zeros in the
kernel that is actually applied); then its first min(seq, seq_len) taps are used.

Causal layers (causal=True) own one kernel `kernel` (k) and apply a linear causal convolution:

    y[t] = Σ_{s=0}^{t} k[t − s] · x[s] + D ⊙ x[t]

Bidirectional layers (causal=False) own two kernels with the same initialisation and the same
regularisers (each regularised on its own, with its own dropout mask): `kernel` (k_fwd, the past and
the present, lags 0..L−1) and `kernel_bwd` (k_bwd, the future, distances 1..L−1), as the paper's
code does for bidirectional models:

    y[t] = Σ_{s=0}^{t} k_fwd[t − s] · x[s]  +  Σ_{s=t+1}^{L−1} k_bwd[s − t − 1] · x[s]  +  D ⊙ x[t]

so the neighbour at distance d ≥ 1 to the right uses k_bwd[d − 1] (tap 0 of the backward kernel
is the nearest future neighbour; the present is counted once, by k_fwd[0]). Computed with the
linear causal op only, with R the time reversal and S the one-step delay ((S z)[t] = z[t − 1],
(S z)[0] = 0):

    y = long_conv(x, k_fwd) + R S long_conv(R x, k_bwd) + D ⊙ x

(both convolutions in one op call over 2·channels). Neither part wraps around: zeros appended to
a sequence contribute nothing to the earlier positions, however many there are. Everything is per
channel; D is the learned per-channel skip and long_conv is `longseq.ops.long_conv(causal=True)`.

Learned butterfly (`learned_butterfly=True`, the seed paper's extension): the DFT inside the
convolution becomes learnable Monarch factors, initialised to the exact DFT and its inverse
(`ops.long_conv_monarch`), one set per layer for its padded length L >= 2·seq_len − 1:

    y = Re(inverse(forward(x) ⊙ forward(k))) + D ⊙ x        (= the convolution at initialisation)

The factors are `Butterfly` parameters ([2, L_i, L_i] matrices and [2, L_i, M_i] twiddles, real and
imaginary parts), run through the Monarch matmuls as XLA ops.

The kernels are `ConvKernel` variables (a subclass of `nnx.Param`), so an optimizer can give the
kernels their own learning rate and weight decay: `nnx.state(model, ConvKernel)` selects them, and
`nnx.Param` still selects every parameter including them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longseq.ops import gated_long_conv
from longseq.ops import long_conv as long_conv_op
from longseq.ops.long_conv_monarch import Butterfly as ButterflyFactors
from longseq.ops.long_conv_monarch import dft_butterflies, split_factors
from longseq.parallel import SequenceParallel


class ConvKernel(nnx.Param):
    """A long-convolution kernel, [channels, kernel_len]: its own parameter group for the optimizer."""


class Butterfly(nnx.Param):
    """A factor of a learned butterfly (a matrix or twiddles, [2, …]): its own parameter group."""


# ----------------------------------------------------------------------------------------------
# Pure functions: initialisation and regularisers


def init_long_conv_kernel(key: jax.Array, channels: int, seq_len: int, *, scale: float = 0.02) -> jax.Array:
    """Small random kernels with a per-channel exponential decay along the taps.

    k[c, t] = scale · N(0, 1) · exp(−rate_c · t / seq_len), rate_c = max(channels/2, 1)^(c/channels):
    channel 0 decays by e^−1 over the whole length, the last channel by about e^−(channels/2), so
    the layer starts with a spread of effective lengths (the decaying "double exponential"
    initialisation of the paper's code; its plain alternative is N(0, 1)·0.002 without decay).

    Returns:
      [channels, seq_len] float32.
    """
    rates = max(channels / 2, 1.0) ** (jnp.arange(channels, dtype=jnp.float32) / channels)  # [channels]
    taps = jnp.arange(seq_len, dtype=jnp.float32) / seq_len  # [seq_len]
    decay = jnp.exp(-rates[:, None] * taps[None, :])
    return scale * jax.random.normal(key, (channels, seq_len), jnp.float32) * decay


def squash(k: jax.Array, lam: float) -> jax.Array:
    """Soft-threshold: sign(k)·max(|k| − λ, 0); entries with |k| <= λ become exactly 0.

    k: [..., taps] -> same shape and dtype. λ = 0 returns k unchanged.
    """
    if lam == 0:
        return k
    return jnp.sign(k) * jnp.maximum(jnp.abs(k) - lam, 0.0)


def smooth(k: jax.Array, width: int) -> jax.Array:
    """Moving average of `width` taps along the last axis, zero-padded to the same length.

    out[..., t] = (1/width) · Σ_{j = t − width//2}^{t + (width−1)//2} k[..., j] (k = 0 outside),
    i.e. numpy.convolve(k, ones(width) / width, mode="same") for every row. width = 1 returns k.

    k: [..., taps] -> same shape and dtype.
    """
    if width == 1:
        return k
    left, right = width // 2, (width - 1) // 2
    padded = jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(left, right)])
    taps = k.shape[-1]
    # a sum of shifted views: differentiable, and cheap for the small widths the regulariser uses
    return sum(padded[..., j:j + taps] for j in range(width)) / width


# ----------------------------------------------------------------------------------------------
# Modules


class LongConv(nnx.Module):
    """Depthwise long convolution with the paper's regularisers and a skip term (see the module
    docstring for the causal and the bidirectional formula).

    Parameters: `kernel` ConvKernel [channels, seq_len] (causal: the kernel; bidirectional: the
    forward kernel, lags 0..), `kernel_bwd` ConvKernel [channels, seq_len] (bidirectional only: the
    backward kernel, future distances 1..), `skip` (D) Param [channels] initialised to 1.
    """

    def __init__(self, channels: int, seq_len: int, *, causal: bool = True, squash_lambda: float = 0.0,
                 smooth_width: int = 1, kernel_dropout: float = 0.0, learned_butterfly: bool = False,
                 dtype: jnp.dtype = jnp.float32, impl: str = "auto",
                 sequence_parallel: SequenceParallel | None = None, rngs: nnx.Rngs):
        """
        Args:
          channels: channels convolved independently.
          seq_len: the kernel length = the longest sequence the kernel covers fully. Shorter inputs
            use the first `seq` taps; longer ones the whole kernel (zero beyond it).
          causal: one kernel, linear causal convolution (True); or a forward and a backward kernel,
            linear convolutions over the past and the future (False).
          squash_lambda, smooth_width, kernel_dropout: the regularisers (LongConvConfig), applied
            to each kernel.
          learned_butterfly: learn the Monarch factors of the DFT (see the module docstring);
            not with sequence_parallel.
          dtype: compute dtype; the kernels are regularised in float32, then cast.
          impl: `KernelsConfig.long_conv`, forwarded to the op.
          sequence_parallel: run the op sequence-parallel (`longseq.parallel.long_conv`) on this
            plan's mesh; None = the single-device op.
          rngs: `params` stream; and a `dropout` stream if kernel_dropout > 0.
        """
        self.channels = channels
        self.seq_len = seq_len
        self.causal = causal
        self.squash_lambda = squash_lambda
        self.smooth_width = smooth_width
        self.dtype = dtype
        self.impl = impl
        self.sequence_parallel = sequence_parallel
        self.kernel = ConvKernel(init_long_conv_kernel(rngs.params(), channels, seq_len))
        if not causal:
            self.kernel_bwd = ConvKernel(init_long_conv_kernel(rngs.params(), channels, seq_len))
        self.skip = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.kernel_dropout = nnx.Dropout(kernel_dropout, rngs=rngs if kernel_dropout > 0 else None)
        butterfly = None
        if learned_butterfly:
            if sequence_parallel is not None:
                raise ValueError("learned_butterfly: not supported with a sequence-sharded mesh")
            forward, inverse = dft_butterflies(split_factors(1 << (2 * seq_len - 2).bit_length()))
            butterfly = nnx.List([nnx.List([Butterfly(x) for x in (*b.matrices, *b.twiddles)])
                                  for b in (forward, inverse)])
        self.butterfly = nnx.data(butterfly)

    def butterflies(self) -> tuple[ButterflyFactors, ButterflyFactors] | None:
        """The learned (forward, inverse) factors as the op takes them, or None."""
        if self.butterfly is None:
            return None
        factors = []
        for group in self.butterfly:
            values = [x[...] for x in group]
            count = (len(values) + 1) // 2  # matrices, then one twiddle fewer
            factors.append(ButterflyFactors(tuple(values[:count]), tuple(values[count:])))
        return tuple(factors)

    def _regularised(self, kernel: ConvKernel, seq: int | None) -> jax.Array:
        k = kernel[...].astype(jnp.float32)
        k = squash(smooth(k, self.smooth_width), self.squash_lambda)
        if seq is not None:
            k = k[:, :seq]
        return self.kernel_dropout(k)

    def effective_kernels(self, seq: int | None = None) -> tuple[jax.Array, ...]:
        """The kernels the convolution applies: smoothed, squashed, dropped out (in training mode).

        Args:
          seq: keep the first min(seq, seq_len) taps (None = all).

        Returns:
          (k,) for a causal layer, (k_fwd, k_bwd) for a bidirectional one; each
          [channels, min(seq, seq_len)] float32, each with its own dropout mask.
        """
        kernels = (self.kernel,) if self.causal else (self.kernel, self.kernel_bwd)
        return tuple(self._regularised(kernel, seq) for kernel in kernels)

    def effective_kernel(self, seq: int | None = None) -> jax.Array:
        """The one kernel a causal layer applies, as `effective_kernels(seq)[0]`: [channels, taps].

        A bidirectional layer has two kernels: use `effective_kernels`.
        """
        if not self.causal:
            raise ValueError("effective_kernel: a bidirectional LongConv (causal=False) has two kernels; "
                             "use effective_kernels()")
        return self.effective_kernels(seq)[0]

    def _convolve(self, x: jax.Array, k: jax.Array) -> jax.Array:
        if self.sequence_parallel is not None:
            y = self.sequence_parallel.long_conv(x, k, causal=True, impl=self.impl)
        else:
            y = long_conv_op(x, k, causal=True, impl=self.impl, butterflies=self.butterflies())
        return checkpoint_name(y, "long_conv_out")  # see longseq.layers.remat

    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """x: [batch, seq, channels] -> [batch, seq, channels] in the compute dtype.

        gate: [batch, seq, channels] or None: return gate ⊙ (the convolution + D ⊙ x), the gated block of
        H3 / Hyena; a causal layer on one device with the exact DFT runs it as one fused op
        (`ops.gated_long_conv`).
        """
        x = x.astype(self.dtype)
        kernels = [k.astype(self.dtype) for k in self.effective_kernels(x.shape[1])]
        skip = self.skip[...].astype(self.dtype)
        if gate is not None and self.causal and self.sequence_parallel is None and self.butterfly is None:
            y = gated_long_conv(x, kernels[0], gate.astype(self.dtype), skip, causal=True, impl=self.impl)
            return checkpoint_name(y, "long_conv_out")
        if self.causal:
            y = self._convolve(x, kernels[0])
        else:
            # One causal convolution over 2·channels: x with k_fwd, and R x (time reversed) with k_bwd.
            both = self._convolve(jnp.concatenate([x, x[:, ::-1]], axis=-1), jnp.concatenate(kernels, axis=0))
            past, reversed_future = jnp.split(both, 2, axis=-1)
            delayed = jnp.pad(reversed_future, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # S: one step later
            y = past + delayed[:, ::-1]  # R S long_conv(R x, k_bwd): distance d uses k_bwd[d − 1]
        y = y + skip * x
        return y if gate is None else gate.astype(self.dtype) * y


class LongConvMixer(nnx.Module):
    """The paper's simplest sequence mixer: LongConv over the d_model channels → GELU → linear.

    As in the S4-style blocks the paper builds on: y = W_out gelu(LongConv(x)), LongConv(x) = k * x + D ⊙ x
    (bidirectional: the two-kernel form of the module docstring). The residual connection and the
    pre-norm belong to the enclosing `Block`.
    """

    def __init__(self, d_model: int, seq_len: int, *, causal: bool, squash_lambda: float = 0.0,
                 smooth_width: int = 1, kernel_dropout: float = 0.0, learned_butterfly: bool = False,
                 dtype: jnp.dtype = jnp.float32, impl: str = "auto",
                 sequence_parallel: SequenceParallel | None = None, rngs: nnx.Rngs):
        """Arguments as in `LongConv` (channels = d_model); the output projection has no bias."""
        self.conv = LongConv(d_model, seq_len, causal=causal, squash_lambda=squash_lambda,
                             smooth_width=smooth_width, kernel_dropout=kernel_dropout,
                             learned_butterfly=learned_butterfly, dtype=dtype, impl=impl,
                             sequence_parallel=sequence_parallel, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model] in the compute dtype."""
        return self.out_proj(nnx.gelu(self.conv(x)))
