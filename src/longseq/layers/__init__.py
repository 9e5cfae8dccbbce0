"""Flax NNX layers: norms, MLP, rotary embeddings, sequence mixers and the residual block.

Shapes are [batch, seq, features] throughout. Parameters are float32; each layer computes in its
`dtype` (float32 or bfloat16) and keeps normalisation statistics and softmax in float32.
"""

from longseq.layers.attention import Attention
from longseq.layers.block import MIXERS, Block, compute_dtype, make_mixer
from longseq.layers.gated_conv import GatedConv, ShortConv, short_conv
from longseq.layers.long_conv import (ConvKernel, LongConv, LongConvMixer, init_long_conv_kernel, smooth,
                                      squash)
from longseq.layers.mlp import SwiGLU, default_mlp_hidden
from longseq.layers.norm import RMSNorm, rms_norm
from longseq.layers.rotary import apply_rotary, rotary_angles

__all__ = [
    "MIXERS",
    "Attention",
    "Block",
    "ConvKernel",
    "GatedConv",
    "LongConv",
    "LongConvMixer",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "apply_rotary",
    "compute_dtype",
    "default_mlp_hidden",
    "init_long_conv_kernel",
    "make_mixer",
    "rms_norm",
    "rotary_angles",
    "short_conv",
    "smooth",
    "squash",
]
