"""Sequence parallelism with `shard_map` over named meshes: the same ops, split across devices."""

from longseq.parallel.attention import ORDERS, STRATEGIES, attention, reorder, zigzag_order
from longseq.parallel.long_conv import long_conv
from longseq.parallel.plan import SequenceParallel

__all__ = ["ORDERS", "STRATEGIES", "SequenceParallel", "attention", "long_conv", "reorder", "zigzag_order"]
