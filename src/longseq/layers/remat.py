"""Rematerialisation (activation checkpointing) of the residual blocks: what a block keeps for the
backward pass is one config value, `train.remat`.

The layers tag the activations a policy may keep, with `jax.ad_checkpoint.checkpoint_name`:

    block_input     each block's input, the float32 residual stream [batch, seq, d_model] (the Backbone
                    tags it): what `full` keeps on the device, and what offload can move to the host
    attention_qkv   q, k, v after the rotary embedding              [batch, seq, heads, head_dim] each
    attention_out   the attention op's output, before out_proj      [batch, seq, heads, head_dim]
    long_conv_out   the long convolution's output (before gelu / D) [batch, seq, channels]
    mlp_hidden      silu(gate) ⊙ up inside the SwiGLU               [batch, seq, mlp_hidden]

Policies, applied to every block with `nnx.remat` (`Remat.apply`):

    none        keep what autodiff keeps (no recomputation)
    full        keep only each block's input; the backward pass recomputes the block
    save_dots   keep the outputs of matmuls without batch dimensions (the projections); recompute the rest
    save_named  keep the activations named in `save`; recompute the rest
    offload     as save_named, but the named activations go to pinned host memory and come back for the
                backward pass (`offload_supported` says whether the devices have such memory)

Independently, `mlp_chunk` runs each block's MLP (with its norm) over blocks of that many positions, each
recomputed in the backward pass (`in_position_blocks`), so the [batch, seq, mlp_hidden] activations never
exist whole: the Mini-Sequence Transformer's remedy (Luo et al. 2024) for the widest activations of a long
sequence. It is exact: the MLP treats every position on its own. With the sequence split over devices, XLA
all-reduces each block's share of the MLP's weight gradients inside the loop, so a layer sends
seq/mlp_chunk − 1 more all-reduces of its MLP weights than unblocked: blocks as large as memory allows.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from longseq.config import ActivationName, RematPolicy

NAMES = typing.get_args(ActivationName)
POLICIES = typing.get_args(RematPolicy)


@dataclasses.dataclass(frozen=True)
class Remat:
    """A rematerialisation policy (one of POLICIES) and, for save_named / offload, the tagged
    activations (NAMES) it keeps."""

    policy: str = "none"
    save: tuple[str, ...] = ()
    mlp_chunk: int | None = None  # positions per block of the MLP (None: the whole sequence at once)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
        unknown = [name for name in self.save if name not in NAMES]
        if unknown:
            raise ValueError(f"save: unknown activation name(s) {unknown}; the layers tag {', '.join(NAMES)}")

    def jax_policy(self) -> Callable[..., Any] | None:
        """The `jax.checkpoint` policy (None = save nothing but the inputs, i.e. full)."""
        policies = jax.checkpoint_policies
        if self.policy == "save_dots":
            return policies.dots_with_no_batch_dims_saveable
        if self.policy == "save_named":
            return policies.save_only_these_names(*self.save)
        if self.policy == "offload":
            return policies.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=list(self.save),
                offload_src="device", offload_dst="pinned_host")
        return None

    def apply(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call(module, *args)` wrapped with the policy (unchanged for none)."""
        if self.policy == "none":
            return call
        return nnx.remat(call, policy=self.jax_policy())


def in_position_blocks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    """fn(x) for a position-wise fn, computed `chunk` positions at a time, each block recomputed in the
    backward pass (so only one block's intermediates exist at once, forward or backward).

    Block j holds positions j, j + n, j + 2n, … (n = seq // chunk blocks), so a sequence split over
    devices in contiguous pieces stays split the same way inside every block.

    Args:
      fn: maps [batch, positions, ...] to [batch, positions, ...], every position on its own.
      x: [batch, seq, ...].
      chunk: positions per block; must divide seq. None or ≥ seq: fn(x), unblocked.
    Returns:
      fn(x): [batch, seq, ...].
    """
    batch, seq = x.shape[:2]
    if chunk is None or chunk >= seq:
        return fn(x)
    if seq % chunk:
        raise ValueError(f"chunk: {chunk} does not divide the sequence length {seq}")
    blocks = seq // chunk
    x_blocks = jnp.moveaxis(x.reshape(batch, chunk, blocks, *x.shape[2:]), 2, 0)  # [blocks, batch, chunk, ...]
    y_blocks = jax.lax.map(jax.checkpoint(fn), x_blocks)
    return jnp.moveaxis(y_blocks, 0, 2).reshape(batch, seq, *y_blocks.shape[3:])


def offload_supported(devices: list[Any]) -> bool:
    """Whether every device can address pinned host memory (what the offload policy moves to)."""
    return all("pinned_host" in {m.kind for m in d.addressable_memories()} for d in devices)
