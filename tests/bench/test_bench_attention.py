"""The attention benchmark on CPU: one tiny shape, the reference against the XLA anchor."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import longseq.config
from longseq.bench.attention import (
    AttentionShape,
    BenchArgumentError,
    add_cudnn_ratios,
    attention_flops,
    format_table,
    run_attention_bench,
    skip_reason,
)
from longseq.bench.timing import time_calls
from longseq.cli import main

TINY = AttentionShape(batch=1, seq_len=128, heads=2, head_dim=32)
IMPLS = ("reference", "anchor_xla", "anchor_cudnn", "anchor_jax_pallas_mha")
ROW_KEYS = {"impl", "B", "N", "H", "D", "dtype", "causal", "pass", "flash", "flops", "ms", "ms_min", "ms_max",
            "tflops", "ratio_to_cudnn", "rel_err", "error"}
ON_GPU = jax.devices()[0].platform == "gpu"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the Python API: 4 impls × 2 causal × 2 passes on TINY, float32."""
    out_dir = tmp_path_factory.mktemp("bench")
    rows = run_attention_bench([TINY], IMPLS, dtype="float32", iters=2, warmup=1, out_dir=out_dir, verbose=False)
    return rows, out_dir


def measured(rows):
    return [row for row in rows if row["impl"] in ("reference", "anchor_xla")]


def test_flops_follow_the_anchors_convention():
    shape = AttentionShape(4, 4096, 16, 128)
    dense = 4 * 4 * 16 * 4096**2 * 128
    assert attention_flops(shape, causal=False, pass_="fwd") == dense
    assert attention_flops(shape, causal=True, pass_="fwd") == dense / 2
    assert attention_flops(shape, causal=False, pass_="fwd+bwd") == dense * 3.5
    assert attention_flops(shape, causal=True, pass_="fwd+bwd") == dense / 2 * 3.5
    # A row of /work/shared/anchors/h100_anchors.json: cuDNN, causal fwd, 0.8983 ms -> 306.0 TFLOP/s.
    assert attention_flops(shape, causal=True, pass_="fwd") / 0.898281499999598e-3 / 1e12 == pytest.approx(
        306.0041946139634, rel=1e-12)


def test_one_row_per_shape_causal_pass_and_impl(bench):
    rows, _ = bench
    assert all(set(row) == ROW_KEYS for row in rows)
    combos = {(row["impl"], row["causal"], row["pass"]) for row in rows}
    assert len(rows) == len(combos) == len(IMPLS) * 2 * 2
    assert {(row["B"], row["N"], row["H"], row["D"], row["dtype"]) for row in rows} == {(*TINY, "float32")}


def test_measured_rows_have_positive_finite_times_and_consistent_tflops(bench):
    rows, _ = bench
    for row in measured(rows):
        assert row["error"] is None, row
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"] and math.isfinite(row["ms_max"])
        assert row["flops"] == attention_flops(TINY, causal=row["causal"], pass_=row["pass"])
        assert row["tflops"] == pytest.approx(row["flops"] / (row["ms"] * 1e-3) / 1e12)
        assert row["tflops"] > 0 and math.isfinite(row["tflops"])


def test_gpu_anchors_are_skipped_with_a_reason_off_gpu(bench):
    rows, _ = bench
    if ON_GPU:
        pytest.skip("the GPU anchors run here")
    for row in rows:
        if row["impl"] in ("anchor_cudnn", "anchor_jax_pallas_mha"):
            assert row["error"].startswith("skipped: needs a GPU"), row
            assert row["ms"] is None and row["tflops"] is None
    assert all(row["ratio_to_cudnn"] is None for row in rows)  # no cuDNN row to compare with


def test_reference_and_xla_anchor_agree(bench):
    rows, _ = bench
    errors = {(row["impl"], row["causal"]): row["rel_err"] for row in measured(rows)}
    assert len(errors) == 4
    assert all(error is not None and error < 1e-5 for error in errors.values()), errors


def test_outputs_are_written(bench):
    rows, out_dir = bench
    data = json.loads((out_dir / "attention.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {"device_kind", "platform", "jax", "date", "command"} <= set(data["meta"])
    assert data["meta"]["jax"] == jax.__version__
    table = (out_dir / "attention.md").read_text()
    assert "| B | N | H | D | dtype | causal | pass | reference | anchor_xla |" in table
    assert table.count("| 1 | 128 | 2 | 32 | float32 |") == 4 + 2  # 4 timing lines, 2 rel_err lines
    assert (out_dir / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_to_cudnn_and_their_table_cells():
    base = {"B": 1, "N": 128, "H": 2, "D": 32, "dtype": "bfloat16", "causal": True, "pass": "fwd", "rel_err": None,
            "error": None}
    rows = add_cudnn_ratios([{**base, "impl": "anchor_cudnn", "tflops": 400.0},
                             {**base, "impl": "pallas", "tflops": 200.0},
                             {**base, "impl": "pallas", "tflops": 300.0, "causal": False},
                             {**base, "impl": "anchor_xla", "tflops": None, "error": "skipped: out of memory"}])
    assert [row["ratio_to_cudnn"] for row in rows] == [1.0, 0.5, None, None]
    table = format_table(rows)
    assert "| 400 | 200 (0.50×) | OOM |" in table
    assert "- anchor_xla: skipped: out of memory (1 row)" in table


def test_dense_implementations_skip_long_sequences():
    long = AttentionShape(1, 32768, 16, 128)
    assert "N > 16384" in skip_reason("anchor_xla", long, "gpu")
    assert skip_reason("anchor_xla", AttentionShape(1, 16384, 16, 128), "gpu") is None
    assert skip_reason("anchor_cudnn", long, "gpu") is None
    assert "needs a GPU" in skip_reason("anchor_cudnn", TINY, "cpu")
    assert "needs a Hopper GPU" in skip_reason("pallas_mosaic_gpu", TINY, "cpu")


def test_unknown_impl_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'flashy'"):
        run_attention_bench([TINY], ["reference", "flashy"], verbose=False)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(passes=("fwd", "bwd")), "passes"),
    (dict(dtype="int32"), "dtype"),
    (dict(iters=0), "iters"),
    (dict(causal=("yes",)), "causal"),
])
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(BenchArgumentError) as raised:
        run_attention_bench([TINY], ["reference"], verbose=False, **kwargs)
    assert raised.value.argument == argument


def test_bad_shape_is_named():
    with pytest.raises(BenchArgumentError, match="shapes"):
        run_attention_bench([(1, 128, 2)], ["reference"], verbose=False)


@pytest.mark.skipif(not hasattr(longseq.config, "FlashAttentionConfig"), reason="no FlashAttentionConfig yet")
def test_unknown_flash_field_is_named():
    with pytest.raises(BenchArgumentError, match="big: unknown FlashAttentionConfig field 'block_z'"):
        run_attention_bench([TINY], ["reference"], flash_variants={"big": {"block_z": 64}}, verbose=False)


def test_timing_reports_median_and_spread():
    timing = time_calls(jax.jit(lambda x: x * 2), jnp.ones(8), iters=5, warmup=1)
    assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
    assert timing.spread_ms == timing.max_ms - timing.min_ms and timing.iters == 5
    with pytest.raises(ValueError, match="iters"):
        time_calls(lambda: None, iters=0)


def test_cli_names_the_bad_argument(capsys, tmp_path):
    assert main(["bench", "attention", "--shape", "1,64,1,16", "--impls", "reference,flashy",
                 "--out", str(tmp_path)]) == 2
    assert "argument --impls: unknown implementation 'flashy'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["bench", "attention", "--shape", "1,64,1"])
    assert exited.value.code == 2
    assert "argument --shape" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "longseq", "bench", "attention", "--shapes", "small", "--impls", "reference,anchor_xla",
         "--iters", "2", "--out", str(out_dir)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[16/16] anchor_xla" in result.stdout  # progress lines
    assert "| B | N | H | D | dtype | causal | pass | reference | anchor_xla |" in result.stdout
    data = json.loads((out_dir / "attention.json").read_text())
    assert len(data["rows"]) == 16 and not any(row["error"] for row in data["rows"])
    assert data["meta"]["command"].startswith("longseq bench attention --shapes small")
    assert (out_dir / "attention.md").exists() and (out_dir / "attention.png").exists()
