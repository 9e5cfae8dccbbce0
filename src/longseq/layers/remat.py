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
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import jax
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


def offload_supported(devices: list[Any]) -> bool:
    """Whether every device can address pinned host memory (what the offload policy moves to)."""
    return all("pinned_host" in {m.kind for m in d.addressable_memories()} for d in devices)
