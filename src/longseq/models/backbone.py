"""The shared trunk of every model: token embedding → residual blocks → final RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longseq.config import KernelsConfig, ModelConfig
from longseq.layers import Block, RMSNorm, compute_dtype
from longseq.layers.remat import Remat
from longseq.parallel.fsdp import constrain_to_batch
from longseq.parallel import SequenceParallel

# The attribute that holds the scanned layers (model.scan_layers): its parameters have a leading
# [repeats] axis (`longseq.train.optimizer.parameter_groups` looks past it).
SCANNED_LAYERS = "layers"


class LayerGroup(nnx.Module):
    """One repeat of the layer pattern: a Block per mixer of `pattern`, in order (what scan_layers stacks)."""

    def __init__(self, config: ModelConfig, kernels: KernelsConfig, *, pattern: tuple[str, ...], seq_len: int,
                 causal: bool, rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None):
        self.blocks = nnx.List([
            Block(config, kernels, mixer=mixer, seq_len=seq_len, causal=causal, rngs=rngs,
                  sequence_parallel=sequence_parallel)
            for mixer in pattern
        ])


class Backbone(nnx.Module):
    """Embedding (float32, N(0, 0.02²)) → `config.num_layers` Blocks with mixers from
    `config.layer_mixers()` → final RMSNorm.

    The residual stream is float32; the blocks' branches compute in the compute dtype.
    Dropout: every `nnx.Dropout` holds its own fork of the `dropout` stream of the constructor's
    `rngs`, so the RNG state lives in `nnx.state(model, nnx.RngState)` and checkpoints resume it;
    `model.train()` / `model.eval()` switch dropout on and off.

    With config.scan_layers the blocks live in `self.layers`, one LayerGroup (a repeat of the mixer
    pattern) whose parameters carry a leading [repeats] axis, run by one `nnx.scan`: XLA compiles one
    repeat, whatever the depth. Otherwise they are `self.blocks`, a list run in a Python loop.
    """

    def __init__(self, config: ModelConfig, kernels: KernelsConfig, *, vocab_size: int, seq_len: int,
                 causal: bool, rngs: nnx.Rngs, sequence_parallel: SequenceParallel | None = None,
                 remat: Remat = Remat()):
        """
        Args:
          config: the model section.
          kernels: op implementations.
          vocab_size: token ids are in [0, vocab_size).
          seq_len: the longest sequence (the long-convolution kernel length).
          causal: decoder (True) or bidirectional encoder (False) mixing in every block.
          rngs: `params` stream; and `dropout` if any dropout rate is > 0.
          sequence_parallel: run the mixers sequence-parallel on this mesh plan (None = one device's op).
          remat: what each block keeps for the backward pass (`longseq.layers.remat`; default: everything).
        """
        self.dtype = compute_dtype(config)
        self.remat = remat
        self.embed = nnx.Embed(vocab_size, config.d_model,
                               embedding_init=nnx.initializers.normal(stddev=0.02), rngs=rngs)
        if config.scan_layers:
            pattern = config.layer_pattern()

            @nnx.split_rngs(splits=config.num_layers // len(pattern))
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_repeats(rngs: nnx.Rngs) -> LayerGroup:
                return LayerGroup(config, kernels, pattern=pattern, seq_len=seq_len, causal=causal, rngs=rngs,
                                  sequence_parallel=sequence_parallel)

            setattr(self, SCANNED_LAYERS, make_repeats(rngs))
        else:
            self.blocks = nnx.List([
                Block(config, kernels, mixer=mixer, seq_len=seq_len, causal=causal, rngs=rngs,
                      sequence_parallel=sequence_parallel)
                for mixer in config.layer_mixers()
            ])
        self.final_norm = RMSNorm(config.d_model, dtype=self.dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """
        Args:
          tokens: [batch, seq] int.
          segment_ids: (q_ids, kv_ids) [batch, seq] each, passed to the attention mixers.
          mask: optional [batch, seq], 1 = real token, 0 = padding. Padded positions of the
            residual stream are zeroed after the embedding and after every block, so the tokens at
            padded positions never reach the real positions: attention keeps them apart through
            `segment_ids` (pass the mask), and the convolution mixers are linear (zero-padded, no
            wrap-around) and have no biases, so zero rows add nothing. With the padding at the end,
            the outputs at real positions also do not depend on how many padding positions there
            are (at least `short_conv_width // 2` for bidirectional gated_conv, whose centred short
            convolution reaches that far past the last real token; see `GatedConv`).
          positions: [seq] the positions of the rows, for the attention mixers' rotary embedding
            (None = 0 .. seq−1; `DecoderLM` passes its zigzag order).

        Returns:
          [batch, seq, d_model] normalised hidden states in the compute dtype.
        """
        h = self.embed(tokens).astype(jnp.float32)
        keep = None if mask is None else mask.astype(jnp.float32)[..., None]
        if keep is not None:
            h = h * keep

        def run_block(block: Block, h: jax.Array) -> jax.Array:
            h = constrain_to_batch(h)  # under a mesh: split as the batch, so FSDP gathers weights, not activations
            h = block(checkpoint_name(h, "block_input"), segment_ids=segment_ids,  # see longseq.layers.remat
                      positions=positions, mlp_chunk=self.remat.mlp_chunk)
            return h if keep is None else h * keep

        run_block = self.remat.apply(run_block)
        if hasattr(self, SCANNED_LAYERS):
            def run_repeat(h: jax.Array, group: LayerGroup) -> jax.Array:
                for block in group.blocks:
                    h = run_block(block, h)
                return h

            h = nnx.scan(run_repeat, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(h, getattr(self, SCANNED_LAYERS))
        else:
            for block in self.blocks:
                h = run_block(block, h)
        return self.final_norm(h)
