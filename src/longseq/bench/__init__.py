"""Benchmarks: longseq's ops and models against the anchors in /work/shared/anchors.

    longseq bench attention ...     (or run_attention_bench from Python)

`timing.time_calls` is the one timing rule every benchmark uses: warm-up, then the median of timed
calls, each blocked on its results.
"""

from longseq.bench.attention import (
    ANCHOR_SHAPES,
    SMALL_SHAPES,
    AttentionShape,
    BenchArgumentError,
    attention_flops,
    format_table,
    plot,
    run_attention_bench,
)
from longseq.bench.timing import Timing, time_calls

__all__ = [
    "ANCHOR_SHAPES",
    "SMALL_SHAPES",
    "AttentionShape",
    "BenchArgumentError",
    "Timing",
    "attention_flops",
    "format_table",
    "plot",
    "run_attention_bench",
    "time_calls",
]
