"""The sequence-parallel plan a model's layers share: one mesh, one attention strategy."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from longseq.ops import attention as attention_op
from longseq.parallel.attention import BALANCED_IN_PLACE, attention
from longseq.parallel.long_conv import long_conv

Array = jax.Array


def keeps_zigzag_order(mixers, seq_len: int, devices: int) -> bool:
    """Whether a causal LM of these mixers keeps its tokens in zigzag order (`DecoderLM`) under a strategy
    that balances in place: every mixer is attention (a convolution needs natural order) and each of the
    sequence devices gets two equal pieces."""
    return devices > 1 and set(mixers) == {"attention"} and seq_len % (2 * devices) == 0


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How the sequence mixers run over a mesh whose (seq_q, seq_kv) axes split the sequence.

    strategy: the attention strategy (`longseq.parallel.STRATEGIES`), or "none" to call the
    single-device op on the global arrays and let XLA's partitioner place it (the baseline).
    keep_gathered: attention2d keeps its gathered blocks for the backward (`parallel.attention`);
    ignored by the other strategies. Long convolutions always use the exact all-to-all scheme of
    `longseq.parallel.long_conv`.
    order: the order of the sequence the mixers get (`parallel.attention`'s `order`): "zigzag" when
    the model keeps its tokens in causal load-balanced order (`DecoderLM` does, where every mixer is
    attention of a strategy that balances in place: `balances_in_place`).
    """

    mesh: Mesh
    strategy: str
    seq_q_axis: str = "seq_q"
    seq_kv_axis: str = "seq_kv"
    keep_gathered: bool = False
    order: str = "natural"

    @property
    def devices(self) -> int:
        """The devices the sequence is split over."""
        return self.mesh.shape[self.seq_q_axis] * self.mesh.shape[self.seq_kv_axis]

    @property
    def balances_in_place(self) -> bool:
        """Whether the strategy attends chunks in zigzag order without swapping anything."""
        return self.strategy in BALANCED_IN_PLACE and self.devices > 1

    def attention(self, q: Array, k: Array, v: Array, **kwargs) -> Array:
        """Attention output [batch, seq, heads, head_dim]; kwargs: causal, segment_ids, impl, flash."""
        if self.strategy == "none":
            return attention_op(q, k, v, **kwargs)[0]
        return attention(q, k, v, mesh=self.mesh, strategy=self.strategy, seq_q_axis=self.seq_q_axis,
                         seq_kv_axis=self.seq_kv_axis, order=self.order,
                         keep_gathered=self.keep_gathered and self.strategy == "attention2d", **kwargs)

    def long_conv(self, u: Array, k: Array, **kwargs) -> Array:
        """`longseq.parallel.long_conv` on this plan's mesh; kwargs: causal, impl."""
        if self.order != "natural":
            raise ValueError(f"order: long convolutions run on the sequence in natural order, got {self.order!r}")
        return long_conv(u, k, mesh=self.mesh, seq_q_axis=self.seq_q_axis, seq_kv_axis=self.seq_kv_axis,
                         **kwargs)
