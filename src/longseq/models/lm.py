"""Decoder-only language model: causal backbone and a (tied) vocabulary projection."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longseq.config import KernelsConfig, ModelConfig
from longseq.layers.remat import Remat
from longseq.models.backbone import Backbone
from longseq import parallel
from longseq.parallel import SequenceParallel
from longseq.parallel.plan import keeps_zigzag_order


@jax.custom_vjp
def vocab_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """h: [batch, seq, d_model] in the compute dtype; head: [vocab, d_model] (any float dtype)
    -> logits [batch, seq, vocab] float32: one matmul in h's dtype, accumulated and returned in float32.

    The backward's two matmuls run in h's dtype too: the logits' cotangent is rounded to it first, as the
    chunked loss does (`longseq.train.losses`). JAX's own transpose of a float32-output matmul would run
    them in float32 (TF32 on a GPU): 15 ms of the 234 ms step of the 370M LM at 4 × 8K on an H200,
    against ~6 ms in bf16. The head's gradient comes back in head's dtype, summed in float32.
    """
    return jnp.einsum("bld,vd->blv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def _vocab_logits_fwd(h, head):
    return vocab_logits(h, head), (h, head)


def _vocab_logits_bwd(residuals, d_logits):
    h, head = residuals
    operands = _backward_operand_dtype(h.dtype)
    d_logits = d_logits.astype(h.dtype).astype(operands)  # rounded to the compute dtype either way
    dh = jnp.einsum("blv,vd->bld", d_logits, head.astype(h.dtype).astype(operands),
                    preferred_element_type=jnp.float32)
    d_head = jnp.einsum("blv,bld->vd", d_logits, h.astype(operands), preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), d_head.astype(head.dtype)


def _backward_operand_dtype(compute_dtype) -> jnp.dtype:
    """The compute dtype, except on XLA's CPU backend: its runtime has no bf16 x bf16 -> float32 matmul outside
    a fusion (`make test` hit it), so there the bf16-rounded operands multiply as float32, to the same sums."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(compute_dtype)


vocab_logits.defvjp(_vocab_logits_fwd, _vocab_logits_bwd)


class DecoderLM(nnx.Module):
    """tokens → Backbone(causal) → logits over the vocabulary, float32.

    With config.tie_embeddings the output projection is the transposed embedding matrix;
    otherwise a separate bias-free linear layer. The projection runs in the compute dtype with
    float32 accumulation and output, forward and backward (`vocab_logits`).
    """

    def __init__(self, config: ModelConfig, kernels: KernelsConfig, *, vocab_size: int, seq_len: int,
                 rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None,
                 remat: Remat = Remat()):
        """
        Args:
          config: the model section.
          kernels: op implementations.
          vocab_size: size of the token vocabulary (input and output).
          seq_len: the longest sequence (the long-convolution kernel length).
          rngs: `params` stream; and `dropout` if any dropout rate is > 0.
          sequence_parallel: run the mixers sequence-parallel on this mesh plan (None = one device's op).
          remat: what each block keeps for the backward pass (`longseq.layers.remat`).
        """
        self.tie_embeddings = config.tie_embeddings
        if (sequence_parallel is not None and sequence_parallel.balances_in_place
                and keeps_zigzag_order(config.layer_mixers(), seq_len, sequence_parallel.devices)):
            # Causal load balance once for the whole model: the tokens go into zigzag order at the
            # input and the hidden states come back at the output, so no attention layer swaps.
            sequence_parallel = dataclasses.replace(sequence_parallel, order="zigzag")
        self.sequence_parallel = sequence_parallel
        self.backbone = Backbone(config, kernels, vocab_size=vocab_size, seq_len=seq_len, causal=True,
                                 rngs=rngs, sequence_parallel=sequence_parallel, remat=remat)
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(config.d_model, vocab_size, use_bias=False, dtype=self.backbone.dtype,
                                      preferred_element_type=jnp.float32, rngs=rngs)

    def __call__(self, tokens: jax.Array, *,
                 segment_ids: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """
        Args:
          tokens: [batch, seq] int32.
          segment_ids: optional (q_ids, kv_ids) [batch, seq] each: attention layers attend within
            a segment only (packed sequences). Convolution mixers ignore them.

        Returns:
          logits [batch, seq, vocab_size] float32; position t depends on tokens[:, :t + 1] only.
        """
        return vocab_logits(self.hidden(tokens, segment_ids=segment_ids), self.head_matrix())

    def hidden(self, tokens: jax.Array, *,
               segment_ids: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """The final hidden states [batch, seq, d_model] in the compute dtype: logits = hidden @ head_matrix().T
        (what a chunked loss takes, `longseq.train.losses.chunked_lm_sums`).

        Under a sequence-parallel plan in zigzag order the rows travel through the blocks in that order,
        with their positions, and come back in natural order here."""
        plan = self.sequence_parallel
        if plan is None or plan.order == "natural":
            return self.backbone(tokens, segment_ids=segment_ids)
        reorder = functools.partial(parallel.reorder, mesh=plan.mesh, seq_q_axis=plan.seq_q_axis,
                                    seq_kv_axis=plan.seq_kv_axis)
        positions = jnp.asarray(parallel.zigzag_order(tokens.shape[1], plan.devices))  # checks the length
        if segment_ids is not None:
            segment_ids = tuple(reorder(x, order="zigzag") for x in segment_ids)
        h = self.backbone(reorder(tokens, order="zigzag"), segment_ids=segment_ids, positions=positions)
        return reorder(h, order="natural")

    def head_matrix(self) -> jax.Array:
        """The output projection as [vocab_size, d_model] float32: the embedding table when tied."""
        if self.tie_embeddings:
            return self.backbone.embed.embedding[...]
        return self.lm_head.kernel[...].T
