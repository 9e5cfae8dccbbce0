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


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) ⊙ up, recomputed in the backward pass from its two inputs.

    gate, up: [..., hidden]. Under `jax.checkpoint` the backward pass keeps only gate and up (which the
    matmuls' transposes need anyway) and recomputes the sigmoid, where plain autodiff would keep four more
    [..., hidden] intermediates: the widest activations of a Transformer block, written and read once each.
    """
    return jax.checkpoint(lambda gate, up: nnx.silu(gate) * up)(gate, up)


class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x); no biases.

    W_gate and W_up are separate [d_model, hidden] matrices: one fused [d_model, 2·hidden] matrix would
    need its output split in two, and the backward pass a concatenation of the two halves' gradients (a
    full pass over the widest activation). Parameters are float32; the matmuls run in `dtype`.
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
        self.gate = nnx.Linear(d_model, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_model] -> [..., d_model] in the compute dtype."""
        hidden = swiglu(self.gate(x), self.up(x))
        return self.down(checkpoint_name(hidden, "mlp_hidden"))  # see longseq.layers.remat
