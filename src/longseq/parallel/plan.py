"""The sequence-parallel plan a model's layers share: one mesh, one attention strategy."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from longseq.ops import attention as attention_op
from longseq.parallel.attention import attention
from longseq.parallel.long_conv import long_conv

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How the sequence mixers run over a mesh whose (seq_q, seq_kv) axes split the sequence.

    strategy: the attention strategy (`longseq.parallel.STRATEGIES`), or "none" to call the
    single-device op on the global arrays and let XLA's partitioner place it (the baseline).
    keep_gathered: attention2d keeps its gathered blocks for the backward (`parallel.attention`);
    ignored by the other strategies. Long convolutions always use the exact all-to-all scheme of
    `longseq.parallel.long_conv`.
    """

    mesh: Mesh
    strategy: str
    seq_q_axis: str = "seq_q"
    seq_kv_axis: str = "seq_kv"
    keep_gathered: bool = False

    def attention(self, q: Array, k: Array, v: Array, **kwargs) -> Array:
        """Attention output [batch, seq, heads, head_dim]; kwargs: causal, segment_ids, impl, flash."""
        if self.strategy == "none":
            return attention_op(q, k, v, **kwargs)[0]
        return attention(q, k, v, mesh=self.mesh, strategy=self.strategy, seq_q_axis=self.seq_q_axis,
                         seq_kv_axis=self.seq_kv_axis,
                         keep_gathered=self.keep_gathered and self.strategy == "attention2d", **kwargs)

    def long_conv(self, u: Array, k: Array, **kwargs) -> Array:
        """`longseq.parallel.long_conv` on this plan's mesh; kwargs: causal, impl."""
        return long_conv(u, k, mesh=self.mesh, seq_q_axis=self.seq_q_axis, seq_kv_axis=self.seq_kv_axis,
                         **kwargs)
