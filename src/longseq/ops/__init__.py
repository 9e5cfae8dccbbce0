"""Sequence-mixing ops: attention and long convolution, each behind one dispatch function.

`impl=` selects the implementation ("auto" = the best one available on the platform).
"""

from longseq.ops.attention import ATTENTION_IMPLS, attention, attention_backward, merge_partials
from longseq.ops.long_conv import LONG_CONV_IMPLS, gated_long_conv, long_conv, long_conv_direct

__all__ = [
    "ATTENTION_IMPLS",
    "LONG_CONV_IMPLS",
    "attention",
    "attention_backward",
    "gated_long_conv",
    "long_conv",
    "long_conv_direct",
    "merge_partials",
]
