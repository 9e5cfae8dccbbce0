"""The long convolution benchmark on CPU: tiny shapes, every implementation against the anchors' formula."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longseq.ops
from longseq.bench.long_conv import (
    ANCHOR,
    COPY_PROBE_BYTES,
    FFT,
    SHAPE_PRESETS,
    BenchArgumentError,
    LongConvShape,
    add_ratios,
    anchor_jnp_fft,
    default_impls,
    format_table,
    long_conv_bytes,
    run_long_conv_bench,
    skip_reason,
)
from longseq.cli import main

# 350: 2N = 700 is not 5-smooth, so our fft pads to 720 while the anchor pads to 700.
SHAPES = [(2, 4, 256, "bfloat16"), (1, 4, 350)]
DTYPES = ("float32",)
ROW_KEYS = {"impl", "B", "H", "N", "dtype", "causal", "pass", "bytes", "ms", "ms_min", "ms_max", "eff_tbps",
            "roofline_fraction", "ratio_to_fft", "ratio_to_anchor", "rel_err", "error"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the Python API: every implementation × 2 shapes (bf16, float32) × 2 causal × 2 passes."""
    out_dir = tmp_path_factory.mktemp("bench")
    rows = run_long_conv_bench(SHAPES, dtypes=DTYPES, causal=(True, False), iters=1, warmup=0, out_dir=out_dir,
                               verbose=False)
    meta = json.loads((out_dir / "long_conv.json").read_text())["meta"]
    return rows, meta, out_dir


def problem(row):
    return (row["B"], row["H"], row["N"], row["dtype"], row["causal"], row["pass"])


def by_impl(rows, impl):
    return {problem(row): row for row in rows if row["impl"] == impl}


def test_one_row_per_problem_and_impl_each_measured_or_skipped_with_a_reason(bench):
    rows, _, _ = bench
    impls = default_impls()
    assert impls[-1] == ANCHOR and FFT in impls and "auto" not in impls
    assert all(set(row) == ROW_KEYS for row in rows)
    assert len(rows) == len({(row["impl"], *problem(row)) for row in rows}) == len(impls) * 2 * 2 * 2
    assert {(row["N"], row["dtype"]) for row in rows} == {(256, "bfloat16"), (350, "float32")}
    for row in rows:
        if row["error"] is None:
            assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"] and math.isfinite(row["ms_max"]), row
        else:
            assert row["error"].startswith("skipped: ") and len(row["error"]) > len("skipped: "), row
            assert row["ms"] is None and row["eff_tbps"] is None and row["ratio_to_fft"] is None
    # Ours and the causal anchor always run; the anchor never runs non-causal.
    assert all(row["error"] is None for row in rows if row["impl"] == FFT)
    for row in by_impl(rows, ANCHOR).values():
        assert (row["error"] is None) == row["causal"], row
        if not row["causal"]:
            assert "causal only" in row["error"]


def test_bytes_follow_the_convention():
    # read u, write y in bf16, read k in float32; ×2 for fwd+bwd
    shape = LongConvShape(8, 768, 16384, "bfloat16")
    once = 2 * 8 * 768 * 16384 * 2 + 768 * 16384 * 4
    assert long_conv_bytes(shape, pass_="fwd") == once
    assert long_conv_bytes(shape, pass_="fwd+bwd") == 2 * once
    assert long_conv_bytes(shape._replace(dtype="float32"), pass_="fwd") == 2 * 8 * 768 * 16384 * 4 + 768 * 16384 * 4


def test_bandwidth_and_ratios_are_computed_from_the_rows(bench):
    rows, meta, _ = bench
    copy_tbps = meta["copy_tbps"]
    assert copy_tbps > 0 and math.isfinite(copy_tbps)
    fft, anchor = by_impl(rows, FFT), by_impl(rows, ANCHOR)
    for row in rows:
        assert row["bytes"] == long_conv_bytes(LongConvShape(row["B"], row["H"], row["N"], row["dtype"]),
                                               pass_=row["pass"])
        if row["ms"] is None:
            continue
        assert row["eff_tbps"] == pytest.approx(row["bytes"] / (row["ms"] * 1e-3) / 1e12)
        assert row["roofline_fraction"] == pytest.approx(row["eff_tbps"] / copy_tbps)
        if row["impl"] == FFT:
            assert row["ratio_to_fft"] is None
        else:
            assert row["ratio_to_fft"] == pytest.approx(fft[problem(row)]["ms"] / row["ms"])
        reference = anchor[problem(row)]
        if row["impl"] == ANCHOR or reference["ms"] is None:
            assert row["ratio_to_anchor"] is None
        else:
            assert row["ratio_to_anchor"] == pytest.approx(reference["ms"] / row["ms"])


def test_ratios_and_their_table_cells():
    base = {"B": 1, "H": 4, "N": 256, "dtype": "bfloat16", "causal": True, "pass": "fwd", "bytes": 4e12,
            "rel_err": None, "error": None}
    rows = add_ratios([{**base, "impl": "fft", "ms": 2.0, "eff_tbps": 2.0},
                       {**base, "impl": "monarch", "ms": 1.0, "eff_tbps": 4.0},
                       {**base, "impl": ANCHOR, "ms": 4.0, "eff_tbps": 1.0},
                       {**base, "impl": "direct", "ms": None, "eff_tbps": None, "error": "skipped: out of memory"}],
                      copy_tbps=8.0)
    assert [row["ratio_to_fft"] for row in rows] == [None, 2.0, 0.5, None]
    assert [row["ratio_to_anchor"] for row in rows] == [2.0, 4.0, None, None]
    assert [row["roofline_fraction"] for row in rows] == [0.25, 0.5, 0.125, None]
    table = format_table(rows)
    assert "| 2 (2.00× anchor) | 1 (2.00× fft, 4.00× anchor) | 4 (0.50× fft) | OOM |" in table
    assert "| 2 (25%) | 4 (50%) | 1 (12%) |" in table
    assert "- direct: skipped: out of memory (1 row)" in table


def test_rel_err_against_our_fft_in_float32(bench):
    rows, _, _ = bench
    for row in rows:
        if row["error"] is None:
            assert row["rel_err"] is not None  # N <= 16384 here
            twin = [other for other in rows if other["impl"] == row["impl"] and problem(other)[:5] == problem(row)[:5]]
            assert len(twin) == 2 and twin[0]["rel_err"] == twin[1]["rel_err"]  # same value on both passes
            if row["impl"] in (FFT, ANCHOR):  # the same arithmetic as the reference, in float32
                assert row["rel_err"] < (1e-5 if row["dtype"] == "float32" else 1e-2), row
            else:  # e.g. Monarch's DFT matmuls: a sanity bound, not a tolerance
                assert row["rel_err"] < 5e-2, row
    assert all(row["rel_err"] == 0 for row in rows if row["impl"] == FFT and row["dtype"] == "float32")


@pytest.mark.parametrize("seq_len", [256, 350])
def test_anchor_formula_equals_our_fft(seq_len):
    """The anchors' formula on [B, H, N] against longseq's fft on the same (transposed) arrays."""
    keys = jax.random.split(jax.random.key(1), 2)
    u = jax.random.normal(keys[0], (2, seq_len, 3), jnp.float32)
    k = jax.random.normal(keys[1], (3, seq_len), jnp.float32)
    ours = jax.jit(lambda u, k: longseq.ops.long_conv(u, k, causal=True, impl="fft"))(u, k)
    anchor = jax.jit(lambda u, k: jnp.swapaxes(anchor_jnp_fft(jnp.swapaxes(u, 1, 2), k), 1, 2))(u, k)
    assert anchor.shape == ours.shape and anchor.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(anchor), np.asarray(ours), atol=1e-4, rtol=0)
    # and both are the causal convolution itself
    direct = jax.jit(lambda u, k: longseq.ops.long_conv_direct(u, k, causal=True))(u, k)
    np.testing.assert_allclose(np.asarray(anchor), np.asarray(direct), atol=1e-3, rtol=0)
    assert jax.eval_shape(anchor_jnp_fft, jnp.swapaxes(u, 1, 2).astype(jnp.bfloat16), k).dtype == jnp.bfloat16


def test_outputs_are_written(bench):
    rows, meta, out_dir = bench
    data = json.loads((out_dir / "long_conv.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert {"device_kind", "platform", "jax", "date", "command", "copy_tbps", "copy_probe",
            "bytes_convention"} <= set(meta)
    assert meta["jax"] == jax.__version__
    table = (out_dir / "long_conv.md").read_text()
    assert "| B | H | N | dtype | causal | pass | " + " | ".join(default_impls()) + " |" in table
    assert table.count("| 2 | 4 | 256 | bfloat16 | yes | fwd+bwd |") == 2  # the ms and the TB/s tables
    assert table.count("| 1 | 4 | 350 | float32 | no |") == 2 * 2 + 1  # both passes twice, and the rel_err line
    assert "Relative error" in table and "copy bandwidth" in table.lower()
    assert (out_dir / "long_conv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impls_follow_long_conv_impls_at_call_time(monkeypatch):
    monkeypatch.setattr(longseq.ops, "LONG_CONV_IMPLS", ("auto", "fft", "monarch", "direct"))
    assert default_impls() == ("fft", "monarch", "direct", ANCHOR)
    assert "N > 4096" in skip_reason("direct", LongConvShape(1, 4, 8192, "float32"), True)
    assert skip_reason("direct", LongConvShape(1, 4, 4096, "float32"), True) is None
    assert skip_reason("monarch", LongConvShape(1, 4, 1 << 20, "float32"), True) is None
    assert "causal only" in skip_reason(ANCHOR, LongConvShape(1, 4, 256, "float32"), False)


def test_a_failing_implementation_is_recorded_and_the_run_goes_on(monkeypatch):
    # "broken" is in the tuple the bench reads but ops.long_conv rejects it: a failure at compile time.
    monkeypatch.setattr(longseq.ops, "LONG_CONV_IMPLS", ("auto", "broken", "fft"))
    monkeypatch.setitem(COPY_PROBE_BYTES, "cpu", 2**20)
    rows = run_long_conv_bench([(1, 2, 64, "float32")], passes=("fwd",), iters=1, warmup=0, verbose=False)
    assert [row["impl"] for row in rows] == ["broken", "fft", ANCHOR]
    assert rows[0]["error"].startswith("skipped: ValueError: impl:") and rows[0]["ms"] is None
    assert rows[1]["error"] is None and rows[2]["error"] is None
    assert rows[2]["ratio_to_fft"] == pytest.approx(rows[1]["ms"] / rows[2]["ms"])


@pytest.mark.parametrize("args, kwargs, argument, message", [
    ([], {}, "shapes", "at least one shape"),
    ([(2, 0, 256)], {}, "shapes", "positive integers"),
    ([(2, 8)], {}, "shapes", "positive integers"),
    ([(2, 8, 256, "int32")], {}, "shapes", "floating dtype"),
    ([(2, 8, 256)], dict(impls=["fft", "nope"]), "impls", "unknown implementation 'nope'; expected one of fft"),
    ([(2, 8, 256)], dict(impls=["auto"]), "impls", "unknown implementation 'auto'"),
    ([(2, 8, 256)], dict(dtypes="bfloat17"), "dtypes", "bfloat17"),
    ([(2, 8, 256)], dict(dtypes=("float32", "int8")), "dtypes", "floating dtype"),
    ([(2, 8, 256)], dict(passes=("fwd", "bwd")), "passes", "subset"),
    ([(2, 8, 256)], dict(causal=("yes",)), "causal", "subset"),
    ([(2, 8, 256)], dict(iters=0), "iters", ">= 1"),
    ([(2, 8, 256)], dict(warmup=-1), "warmup", ">= 0"),
])
def test_bad_arguments_are_named(args, kwargs, argument, message):
    with pytest.raises(BenchArgumentError) as raised:
        run_long_conv_bench(args, verbose=False, **kwargs)
    assert raised.value.argument == argument
    assert message in raised.value.message


def test_presets():
    anchors = SHAPE_PRESETS["anchors"]
    assert len(anchors) == 8 and [shape.dtype for shape in anchors].count("float32") == 2
    assert (1, 256, 1048576, "bfloat16") in anchors and (8, 768, 16384, "float32") in anchors
    assert all(shape.dtype == "float32" and shape.seq_len <= 1000 for shape in SHAPE_PRESETS["small"])


def test_cli_end_to_end(capsys, tmp_path):
    """Two cheap impls (the fixture above runs every impl through the Python API)."""
    out_dir = tmp_path / "out"
    assert main(["bench", "long_conv", "--shape", "2,4,64", "--dtype", "float32", "--impls", f"fft,{ANCHOR}",
                 "--iters", "1", "--warmup", "0", "--out", str(out_dir)]) == 0
    stdout = capsys.readouterr().out
    total = 1 * 2 * 2  # shapes × impls × passes
    assert "copy bandwidth:" in stdout and f"[{total}/{total}] {ANCHOR}" in stdout  # progress lines
    assert f"| B | H | N | dtype | causal | pass | fft | {ANCHOR} |" in stdout
    data = json.loads((out_dir / "long_conv.json").read_text())
    assert len(data["rows"]) == total and all(row["causal"] for row in data["rows"])
    assert {(row["N"], row["dtype"]) for row in data["rows"]} == {(64, "float32")}
    assert data["meta"]["command"].startswith("longseq bench long_conv --shape 2,4,64")
    assert (out_dir / "long_conv.md").exists() and (out_dir / "long_conv.png").exists()


def test_cli_names_the_bad_argument(capsys, tmp_path):
    assert main(["bench", "long_conv", "--shape", "1,2,64", "--impls", "fft,nope", "--out", str(tmp_path)]) == 2
    assert "longseq bench long_conv: error: argument --impls: unknown implementation 'nope'" in capsys.readouterr().err
    assert main(["bench", "long_conv", "--shape", "1,2,64", "--dtype", "int8", "--out", str(tmp_path)]) == 2
    assert "longseq bench long_conv: error: argument --dtype: " in capsys.readouterr().err
    assert main(["bench", "long_conv", "--shape", "1,2,64", "--passes", "bwd", "--out", str(tmp_path)]) == 2
    assert "longseq bench long_conv: error: argument --passes: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["bench", "long_conv", "--shape", "1,64"])
    assert exited.value.code == 2
    assert "argument --shape" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_gated_rows_time_the_gated_block_and_check_it(monkeypatch):
    """gated_monarch (the fused kernel, interpret mode here) and gated_fft (the formula around jnp.fft) time
    u ⊙ (k ∗ u + u); their rel_err is against the same formula on our fft, so it stays small."""
    monkeypatch.setitem(COPY_PROBE_BYTES, "cpu", 2**20)
    rows = run_long_conv_bench([(1, 2, 256, "float32")], impls=["fft", "gated_fft", "gated_monarch"],
                               causal=(True,), passes=("fwd",), iters=1, warmup=0, verbose=False)
    assert [row["impl"] for row in rows] == ["fft", "gated_fft", "gated_monarch"]
    assert all(row["error"] is None and row["ms"] > 0 for row in rows)
    assert rows[1]["rel_err"] < 1e-5 and rows[2]["rel_err"] < 1e-5
    with pytest.raises(BenchArgumentError, match="gated_anchor_jnp_fft"):
        run_long_conv_bench([(1, 2, 256, "float32")], impls=["gated_anchor_jnp_fft"], verbose=False)
