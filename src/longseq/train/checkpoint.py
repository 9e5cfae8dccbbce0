"""Checkpoints of the whole training state with orbax, as flat name -> array dicts.

The training state (parameters, non-parameter model state such as dropout RNG counters, optimizer
state, step) is flattened to {"params/blocks/0/...": array}. Names make a checkpoint readable and
make a restore into a different structure fail loudly instead of silently mis-assigning arrays.
Typed PRNG keys are stored as their raw key data and re-wrapped on restore.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _name(path: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "/", jax.tree_util.keystr(path)).strip("/")


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def flatten(tree: Any) -> dict[str, Any]:
    """{name: array} for every leaf of `tree` (PRNG keys as key data)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = {_name(path): (jax.random.key_data(leaf) if _is_key(leaf) else leaf) for path, leaf in leaves}
    if len(flat) != len(leaves):
        raise ValueError("two state leaves map to the same checkpoint name")
    return flat


def unflatten(flat: dict[str, Any], like: Any) -> Any:
    """Inverse of `flatten`, shaped like the template `like` (whose PRNG-key leaves are re-wrapped)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    restored = []
    for path, template in leaves:
        value = flat[_name(path)]
        if _is_key(template):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(template))
        restored.append(value)
    return jax.tree_util.tree_unflatten(treedef, restored)


class Checkpointer:
    """Save/restore the training state under `directory/<step>/`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(Path(directory).resolve(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(flatten(state)))
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restore step `step` into the structure, shapes and shardings of the template `like`."""
        def abstract(leaf):
            sharding = getattr(leaf, "sharding", None)
            return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)
        template = {name: abstract(leaf) for name, leaf in flatten(like).items()}
        flat = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        return unflatten(flat, like)

    def close(self) -> None:
        self._manager.close()
