"""Sequence parallelism with `shard_map` over named meshes: the same ops, split across devices."""

from longseq.parallel.attention import STRATEGIES, SequenceParallel, attention

__all__ = ["STRATEGIES", "SequenceParallel", "attention"]
