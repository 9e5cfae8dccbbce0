"""The sequence-parallel attention benchmark on whatever devices exist.

`make test` runs this folder on 1 CPU device and again on 8 simulated ones
(XLA_FLAGS=--xla_force_host_platform_device_count=8): every check holds for any device count.
"""

import json
import math

import jax
import pytest

from longseq.bench.attention import AttentionShape
from longseq.bench.parallel import (
    ALLGATHER_CUDNN,
    SHAPE_PRESETS,
    BenchArgumentError,
    add_ratios,
    attention_flops,
    default_grids,
    format_table,
    resolve_impls,
    run_parallel_bench,
)
from longseq.cli import main
from longseq.parallel import STRATEGIES

DEVICES = jax.device_count()
ON_GPU = jax.devices()[0].platform == "gpu"
SMALL = SHAPE_PRESETS["small"]
# One 2-D grid of the two-axis strategies where the device count allows (Pq, Pkv > 1), every other
# strategy on 1×P: all strategies covered, a few compiles only.
GRID = (2, DEVICES // 2) if DEVICES % 2 == 0 else (1, DEVICES)
IMPLS = tuple(f"sp_{strategy}[{GRID[0]}x{GRID[1]}]" for strategy in ("attention2d", "usp", "double_ring")) + (
    "sp_ring", "sp_ulysses", "sp_allgather_kv", "single_device_reference", ALLGATHER_CUDNN)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the Python API on the small preset: both causal settings, the forward (cheaper to
    compile than fwd+bwd; every strategy's gradients are tested in test_attention.py), one timed call."""
    out_dir = tmp_path_factory.mktemp("bench_parallel")
    rows = run_parallel_bench(SMALL.seq_lens, IMPLS, batch=SMALL.batch, heads=SMALL.heads, head_dim=SMALL.head_dim,
                              dtype=SMALL.dtype, passes=("fwd",), block_impl="reference", iters=1, warmup=1,
                              out_dir=out_dir, verbose=False, command="test")
    return rows, out_dir


def test_flops_follow_the_anchors_convention():
    # A row of /work/shared/anchors/README.md (2 GPUs): N = 131072, non-causal fwd+bwd.
    shape = AttentionShape(1, 131072, 16, 128)
    dense = 4 * 16 * 131072**2 * 128
    assert attention_flops(shape, causal=False, pass_="fwd+bwd") == dense * 3.5
    assert attention_flops(shape, causal=True, pass_="fwd+bwd") == dense / 2 * 3.5
    assert attention_flops(shape, causal=True, pass_="fwd") == dense / 2


def test_default_grids():
    assert default_grids("attention2d", 2) == ((1, 2), (2, 1))
    assert default_grids("attention2d", 8) == ((1, 8), (2, 4), (4, 2), (8, 1))
    assert default_grids("ring", 8) == ((1, 8),)
    names = [impl.name for impl in resolve_impls(["sp_attention2d", "sp_ring"], devices=2, block_impl="pallas")]
    assert names == ["sp_attention2d[1x2]", "sp_attention2d[2x1]", "sp_ring[1x2]"]


def test_every_row_is_measured_or_skipped_with_a_reason(bench):
    rows, _ = bench
    sp_rows = [row for row in rows if row["impl"].startswith("sp_")]
    assert {row["strategy"] for row in sp_rows} == set(STRATEGIES)
    assert len(rows) == len({(row["impl"], row["causal"], row["pass"]) for row in rows}) == len(IMPLS) * 2
    for row in rows:
        if row["error"] is not None:
            assert row["error"].startswith("skipped: ") and row["ms"] is None
            continue
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"] and math.isfinite(row["ms_max"])
        assert row["flops"] == attention_flops(AttentionShape(SMALL.batch, SMALL.seq_lens[0], SMALL.heads,
                                                              SMALL.head_dim), causal=row["causal"], pass_="fwd")
        assert row["tflops"] == pytest.approx(row["flops"] / (row["ms"] * 1e-3) / 1e12)
    for row in sp_rows:  # 8 heads: ulysses fits 1, 2, 4 and 8 devices
        assert row["error"] is None, row
        assert row["devices"] == DEVICES and math.isfinite(row["tflops"]) and row["tflops"] > 0
        assert row["scaling_efficiency"] == pytest.approx(row["tflops"] / (DEVICES * next(
            r["tflops"] for r in rows if r["impl"] == "single_device_reference" and r["causal"] == row["causal"])))
        # the order an LM keeps its tokens in: zigzag where the strategy balances in place
        assert row["order"] == ("zigzag" if row["strategy"] in ("attention2d", "ring", "allgather_kv", "double_ring")
                                else "natural")


def test_allgather_cudnn_anchor_is_non_causal_only(bench):
    rows, _ = bench
    anchor = {row["causal"]: row for row in rows if row["impl"] == ALLGATHER_CUDNN}
    assert "causal offset" in anchor[True]["error"]
    if not ON_GPU:
        assert "needs a GPU" in anchor[False]["error"]


def test_outputs_are_written(bench):
    rows, out_dir = bench
    written = json.loads((out_dir / "parallel.json").read_text())
    assert written["meta"]["device_count"] == DEVICES and written["meta"]["command"] == "test"
    assert len(written["rows"]) == len(rows)
    assert (out_dir / "parallel.png").stat().st_size > 0
    table = (out_dir / "parallel.md").read_text()
    assert all(name in table for name in {row["impl"] for row in rows})


def test_efficiency_and_allgather_ratio_cells():
    base = {"B": 1, "N": 1024, "H": 16, "D": 128, "dtype": "bfloat16", "causal": False, "pass": "fwd+bwd",
            "ms": 1.0, "error": None}
    rows = add_ratios([{**base, "impl": "single_device_pallas", "devices": 1, "tflops": 500.0},
                       {**base, "impl": ALLGATHER_CUDNN, "devices": 2, "tflops": 950.0},
                       {**base, "impl": "sp_ring[1x2]", "devices": 2, "tflops": 475.0}], "single_device_pallas")
    single, anchor, ring = rows
    assert single["scaling_efficiency"] is None and anchor["ratio_to_allgather_cudnn"] is None
    assert anchor["scaling_efficiency"] == pytest.approx(0.95)
    assert ring["scaling_efficiency"] == pytest.approx(0.475) and ring["ratio_to_allgather_cudnn"] == 0.5
    assert "475 (48%, 0.50× ag)" in format_table(rows)


@pytest.mark.parametrize("impls, expected", [(["sp_nope"], "'sp_nope'"), (["flash"], "'flash'"), (["sp_ring/0"], "sp_ring/0"),
                                             ([f"sp_ring[3x{DEVICES + 1}]"], f"sp_ring[3x{DEVICES + 1}]")])
def test_unknown_impl_is_a_value_error_naming_it(impls, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[")) as error:
        run_parallel_bench([256], impls, heads=2, head_dim=8, dtype="float32", verbose=False)
    assert isinstance(error.value, BenchArgumentError) and error.value.argument == "impls"


@pytest.mark.parametrize("kwargs, argument", [({"seq_lens": [0]}, "seq_lens"), ({"heads": 0}, "heads"),
                                              ({"passes": ["bwd"]}, "passes"), ({"iters": 0}, "iters"),
                                              ({"block_impl": "magic"}, "block_impl")])
def test_bad_arguments_are_named(kwargs, argument):
    kwargs = {"seq_lens": [256], **kwargs}
    with pytest.raises(BenchArgumentError) as error:
        run_parallel_bench(impls=["sp_ring"], verbose=False, **kwargs)
    assert error.value.argument == argument


def test_cli_end_to_end_and_bad_arguments(capsys, tmp_path):
    assert main(["bench", "parallel", "--shapes", "small", "--impls", "sp_allgather_kv", "--causal", "no",
                 "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert "sp_allgather_kv[1x" in capsys.readouterr().out
    assert (tmp_path / "parallel.json").exists()
    assert main(["bench", "parallel", "--shapes", "small", "--impls", "sp_bogus"]) == 2
    error = capsys.readouterr().err
    assert "argument --impls" in error and "sp_bogus" in error
    if DEVICES > 1:
        assert main(["bench", "parallel", "--seq", str(8 * DEVICES + 1)]) == 2
        assert "argument --seq" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own check of the type
        main(["bench", "parallel", "--heads", "0"])
    assert exit_.value.code == 2
