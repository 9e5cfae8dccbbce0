import jax.numpy as jnp
import pytest

from longseq.bench.timing import short_reason, time_calls, time_rows


def test_time_calls_checks_its_counts():
    with pytest.raises(ValueError, match="iters"):
        time_calls(lambda: None, iters=0)
    with pytest.raises(ValueError, match="warmup"):
        time_calls(lambda: None, warmup=-1)


def test_short_calls_are_timed_in_groups_and_long_ones_one_by_one():
    import time

    from longseq.bench import timing

    calls = []
    fast = time_calls(lambda: calls.append(1), iters=3, warmup=1)
    assert len(calls) == 1 + 3 * timing.MAX_GROUP  # a call of ~µs: the largest group
    assert fast.median_ms < timing.SHORT_CALL_MS

    calls.clear()
    slow = time_calls(lambda: calls.append(time.sleep(timing.SHORT_CALL_MS * 1.5e-3)), iters=3, warmup=1)
    assert len(calls) == 1 + 3
    assert slow.min_ms >= timing.SHORT_CALL_MS * 1.5


def test_a_failing_pass_is_skipped_with_its_reason_and_the_next_is_still_timed():
    def fails(x):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating\nmore detail")

    rows = [{"pass": "fwd+bwd", "flops": 2.0}, {"pass": "fwd", "flops": 1.0}]
    seen = []
    time_rows(rows, {"fwd": (lambda x: x * 2, (jnp.ones(4),)), "fwd+bwd": (fails, (jnp.ones(4),))}, reason=None,
              iters=2, warmup=1, on_row=seen.append, measured={"rel_err": 1e-3},
              rate=lambda row, seconds: {"per_s": row["flops"] / seconds})
    assert seen == rows
    assert rows[0]["error"] == "skipped: out of memory" and "ms" not in rows[0]
    assert rows[1]["ms_min"] <= rows[1]["ms"] <= rows[1]["ms_max"]
    assert rows[1]["per_s"] == pytest.approx(1.0 / (rows[1]["ms"] * 1e-3)) and rows[1]["rel_err"] == 1e-3


def test_a_problem_skipped_for_a_reason_times_nothing():
    called = []
    rows = [{"pass": "fwd"}, {"pass": "fwd+bwd"}]
    time_rows(rows, {"fwd": (called.append, (1,)), "fwd+bwd": (called.append, (2,))}, reason="dense N² scores",
              iters=1, warmup=0, on_row=lambda row: None, rate=lambda row, seconds: {})
    assert not called and [row["error"] for row in rows] == ["skipped: dense N² scores"] * 2


def test_short_reason_is_one_short_line():
    assert short_reason(ValueError("first line\nsecond")) == "ValueError: first line"
    assert short_reason(KeyError()) == "KeyError"
    assert len(short_reason(RuntimeError("x" * 500))) == 200
