"""The SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def default_mlp_hidden(d_model: int) -> int:
    """8/3 · d_model rounded up to a multiple of 64 (same parameter count as a 4·d_model GELU MLP)."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x); no biases.

    W_gate and W_up are fused in one [d_model, 2·hidden] matrix. Parameters are float32; the
    matmuls run in `dtype`.
    """

    def __init__(self, d_model: int, hidden: int | None = None, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        """
        Args:
          d_model: input and output width.
          hidden: width of the gated hidden layer (None = default_mlp_hidden(d_model)).
          dtype: compute dtype of the matmuls and of the output.
          rngs: needs a `params` stream (or a default one).
        """
        hidden = hidden or default_mlp_hidden(d_model)
        self.hidden = hidden
        self.gate_up = nnx.Linear(d_model, 2 * hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_model] -> [..., d_model] in the compute dtype."""
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return self.down(checkpoint_name(nnx.silu(gate) * up, "mlp_hidden"))  # see longseq.layers.remat
