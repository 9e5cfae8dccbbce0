"""Rotary position embeddings (Su et al. 2021, "RoFormer").

Feature pairs (i, i + head_dim/2) of every head are rotated by the angle position · θ^(−2i/head_dim)
("rotate-half" layout). Because a rotation by m·ω followed by the transpose of a rotation by n·ω
is a rotation by (m − n)·ω, the dot product of a rotated query at position m and a rotated key
at position n depends on the positions only through m − n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Rotation angles.

    Args:
      positions: [seq] or [batch, seq], integer or float.
      head_dim: even feature size of a head.
      theta: base of the geometric frequency ladder.

    Returns:
      [..., seq, head_dim // 2] float32 angles (leading batch axis iff positions has one).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: must be even for rotary embeddings, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [head_dim/2]
    inv_freq = 1.0 / (theta ** exponents)
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotate the features of x by their positions.

    Args:
      x: [batch, seq, heads, head_dim], head_dim even.
      positions: [seq] (shared by the batch) or [batch, seq].
      theta: base of the frequencies (ModelConfig.rope_theta).

    Returns:
      [batch, seq, heads, head_dim] in x's dtype (the rotation itself is computed in float32).
    """
    angles = rotary_angles(positions, x.shape[-1], theta)  # [(batch,) seq, head_dim/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # [batch | 1, seq, 1, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
