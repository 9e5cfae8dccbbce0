"""Fully sharded data parallelism (ZeRO-3): parameters, gradients and optimizer state split over the
mesh's `fsdp` axis; XLA gathers each weight where a layer uses it and reduce-scatters its gradient.

The split is a function of an array's shape alone, so a parameter and its Adam moments always split
the same way and no layer names its own sharding: the largest dimension the axis divides is split (the
first of equal ones); arrays none of whose dimensions it divides (scalars, odd-sized vectors) are
replicated. The batch splits over the fsdp devices as over the data-parallel ones (`batch_spec`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# JAX's mesh context: in jax.sharding first, at the top level in newer versions
_get_abstract_mesh = getattr(jax, "get_abstract_mesh", None) or jax.sharding.get_abstract_mesh
_use_abstract_mesh = getattr(jax, "use_abstract_mesh", None) or jax.sharding.use_abstract_mesh

BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXES = ("seq_q", "seq_kv")


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, axis: str = "fsdp") -> PartitionSpec:
    """The PartitionSpec of an array of `shape` on an fsdp axis of `fsdp_size` devices."""
    if fsdp_size == 1:
        return PartitionSpec()
    divisible = [d for d, n in enumerate(shape) if n % fsdp_size == 0 and n > 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda d: (shape[d], -d))
    return PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))


def state_shardings(mesh: Mesh, state: Any, axis: str = "fsdp") -> Any:
    """A pytree like `state` (arrays or ShapeDtypeStructs) of the NamedSharding of each leaf."""
    size = mesh.shape.get(axis, 1)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), size, axis)), state)


def on_mesh(mesh: Mesh | None):
    """Context in which `constrain_to_batch` places activations on `mesh` (usable inside jit); None: none."""
    return contextlib.nullcontext() if mesh is None else _use_abstract_mesh(mesh.abstract_mesh)


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """x: [batch, seq, ...] split as the batch is (batch over data × fsdp, seq over the sequence grid, the
    rest whole) on the mesh of the enclosing `on_mesh` (the trainer's step runs its model there); x unchanged
    outside one.

    Without it XLA's partitioner may give an activation the split of the FSDP-sharded weight that made it
    (heads over fsdp), different for q and for k, v; cuDNN's attention partitioner refuses q, k, v split
    differently.
    """
    mesh = _get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES + SEQUENCE_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES, SEQUENCE_AXES))


def batch_spec(ndim: int) -> PartitionSpec:
    """Batch arrays: axis 0 over data × fsdp; [batch, seq] arrays' axis 1 over the sequence grid."""
    return PartitionSpec(BATCH_AXES, SEQUENCE_AXES) if ndim == 2 else PartitionSpec(BATCH_AXES)
