"""Wall-clock timing of JAX calls, shared by the benchmarks.

A call is timed from dispatch until every output buffer is ready (`jax.block_until_ready`), so
asynchronous dispatch does not hide device time. Warm-up calls come first: the first one compiles,
the next ones let caches and clocks settle. The median of the timed calls is the figure to report
(robust to one slow call on a shared machine); min and max show how noisy the machine was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over `iters` timed calls."""

    median_ms: float
    min_ms: float
    max_ms: float
    iters: int

    @property
    def spread_ms(self) -> float:
        """max − min of the timed calls: how far apart the fastest and the slowest were."""
        return self.max_ms - self.min_ms


def time_calls(fn: Callable[..., Any], *args: Any, iters: int = 10, warmup: int = 3) -> Timing:
    """Call `fn(*args)` `warmup` times untimed, then `iters` times timed one by one.

    Args:
      fn: usually a jitted function; its outputs (any pytree of arrays) are waited for.
      args: passed unchanged to every call.
      iters: timed calls (>= 1).
      warmup: untimed calls first (>= 0); the first call of a jitted function includes compilation,
        so leave at least 1 unless compile time is what you want to see.

    Returns:
      Timing with the median, min and max in milliseconds.
    """
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times_ms = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times_ms.append((time.perf_counter() - start) * 1e3)
    return Timing(median_ms=statistics.median(times_ms), min_ms=min(times_ms), max_ms=max(times_ms),
                  iters=iters)
