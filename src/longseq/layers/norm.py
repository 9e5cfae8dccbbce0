"""RMS normalisation (Zhang & Sennrich 2019): rescale by the root mean square, no mean subtraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """y = x / sqrt(mean(x², axis=-1) + eps) · scale, computed in float32.

    Args:
      x: [..., features], any float dtype.
      scale: [features].
      eps: added to the mean square.

    Returns:
      [..., features] in float32; callers cast to their compute dtype.
    """
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(mean_square + eps) * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-feature scale (initialised to 1).

    The statistics are always computed in float32; the output is cast to `dtype` (the compute
    dtype of the layer that follows). The backward pass recomputes the normalisation from x
    (`jax.checkpoint`): it keeps no float32 intermediates of its own, only x, which the residual
    stream keeps anyway.
    """

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: jnp.dtype = jnp.float32):
        """
        Args:
          features: size of the last axis.
          eps: added to the mean square.
          dtype: dtype of the output.
        """
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., features] -> [..., features] in `dtype`."""
        normalise = lambda x, scale: rms_norm(x, scale, eps=self.eps).astype(self.dtype)
        return jax.checkpoint(normalise)(x, self.scale[...])
