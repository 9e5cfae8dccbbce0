"""Wall-clock timing of JAX calls, shared by the benchmarks.

A call is timed from dispatch until every output buffer is ready (`jax.block_until_ready`), so
asynchronous dispatch does not hide device time. Warm-up calls come first: the first one compiles,
the next ones let caches and clocks settle. The median of the timed calls is the figure to report
(robust to one slow call on a shared machine); min and max show how noisy the machine was.

Calls shorter than SHORT_CALL_MS are timed in groups: a sample dispatches enough calls back to back to
fill SHORT_CALL_MS (at most MAX_GROUP) and waits once, so the host's dispatch latency (~0.1 ms a call on
a GPU) overlaps the device's work instead of adding to every sample; a sample's time is divided by
its calls. What is reported is then the device's time per call, as a training loop sees it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax


SHORT_CALL_MS = 2.0
MAX_GROUP = 20


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
    """Call `fn(*args)` `warmup` times untimed, then take `iters` timed samples (calls one by one, or in
    groups for calls shorter than SHORT_CALL_MS: the module docstring).

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
    last_ms = None
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        last_ms = (time.perf_counter() - start) * 1e3
    group = 1 if not last_ms or last_ms >= SHORT_CALL_MS else min(MAX_GROUP, math.ceil(SHORT_CALL_MS / last_ms))
    times_ms = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(group)])
        times_ms.append((time.perf_counter() - start) * 1e3 / group)
    return Timing(median_ms=statistics.median(times_ms), min_ms=min(times_ms), max_ms=max(times_ms),
                  iters=iters)


def short_reason(error: BaseException) -> str:
    """One short line for a row's `error`: out-of-memory recognised, else the type and first line."""
    text = str(error).strip()
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "out of memory"
    first_line = text.splitlines()[0] if text else ""
    reason = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def time_rows(rows: Sequence[dict[str, Any]], calls: Mapping[str, tuple[Callable[..., Any], tuple]], *,
              reason: str | None, iters: int, warmup: int, rate: Callable[[dict[str, Any], float], dict[str, Any]],
              on_row: Callable[[dict[str, Any]], None], measured: Mapping[str, Any] | None = None
              ) -> Sequence[dict[str, Any]]:
    """Time the rows of one problem, one row per pass, as every benchmark does.

    Args:
      rows: dicts with a "pass" key ("fwd", "fwd+bwd", ...), updated in place.
      calls: {pass: (fn, args)}: what a row of that pass times, `time_calls(fn, *args)`.
      reason: why the whole problem is skipped (None = measure it): each row gets error "skipped: reason".
      iters, warmup: as `time_calls`.
      rate: rate(row, seconds per call) -> the row's rate columns (e.g. {"tflops": ...}).
      on_row: called with each row once it is finished (progress lines).
      measured: columns every measured row gets (e.g. the forward's error against the reference).

    A row whose call raises (out of memory, an unsupported shape) gets error "skipped: <short reason>" and the
    next row is still measured; each row's outputs are collected before the next row allocates.
    """
    for row in rows:
        if reason is not None:
            row["error"] = f"skipped: {reason}"
        else:
            row.update(measured or {})
            try:
                fn, args = calls[row["pass"]]
                timing = time_calls(fn, *args, iters=iters, warmup=warmup)
                row.update(ms=timing.median_ms, ms_min=timing.min_ms, ms_max=timing.max_ms,
                           **rate(row, timing.median_ms * 1e-3))
            except Exception as error:  # noqa: BLE001 - OOM, "not supported", ...
                row["error"] = f"skipped: {short_reason(error)}"
            gc.collect()  # drop this row's outputs before the next row allocates
        on_row(row)
    return rows
