"""Long convolution benchmark: `longseq.ops.long_conv` against the anchors' jnp.fft convolution.

One row per shape × dtype × causal × pass × implementation, all measured in one process on the same
inputs:

    u, dy: [batch, seq_len, channels] random normal in the row's dtype, k: [channels, seq_len]
           random normal float32; generated once per shape and dtype
    fwd:       jit(conv)(u, k) -> y
    fwd+bwd:   jit(grad(sum(y · dy) in float32, wrt (u, k)))(u, k, dy)

Shapes are (B, H, N) = (batch, channels, seq_len), each measured in every dtype of `dtypes`, or
(B, H, N, dtype) with their own (the presets in SHAPE_PRESETS are the latter).

Implementations (names as they appear in the rows):

    any name in longseq.ops.LONG_CONV_IMPLS   longseq.ops.long_conv(u, k, causal=causal, impl=name), u
    but "auto" (read at call time)            channels last; e.g. "fft" (ours, the ratio_to_fft
                                              reference), "direct" (skipped past N = 4096: its
                                              [H, N, N] matrix), "monarch"
    "gated_IMPL" (IMPL in LONG_CONV_IMPLS      longseq.ops.gated_long_conv(u, k, gate=u, skip=1, impl=IMPL):
    but "auto")                               the H3 / Hyena gated block, u ⊙ (k ∗ u + u); "gated_monarch"
                                              fuses the gate into the Monarch kernel, "gated_fft" is the
                                              formula around jnp.fft (their ratio is what fusing saves).
                                              Bytes as for the plain rows (the gate is u: no more to read);
                                              rel_err against the same formula on our fft
    "anchor_jnp_fft"                          the anchors' formula (/work/shared/anchors/README.md,
                                              "FFT long convolution with jnp.fft"), verbatim, on
                                              u: [B, H, N] (the transposes of the same arrays), in float32:
                                              irfft(rfft(u, 2N) · rfft(k, 2N), 2N)[..., :N] cast to u's
                                              dtype. Causal only: its causal=False rows are skipped.

Bytes are the fewest that must move: read u and k, write y, each at its dtype's itemsize (k is
float32), twice that for forward+backward (the anchors' convention for the factor 2; note that the
anchors' raw rows counted k at u's dtype, so for bf16 our `bytes` are a little higher, by H·N·2, and
eff_tbps is not comparable digit for digit with their table; ratios measured in one run are).
The roofline is the device's copy bandwidth, measured once per run in the same process
(`copy_bandwidth`: jit(x · 1.5 + 1) over 1 GiB of float32, 64 MiB on CPU, bytes read + written over
the median time) and stored in the metadata as copy_tbps.

A row that cannot run (the anchor non-causal, "direct" past N = 4096, out of memory, an
implementation that rejects the shape) is recorded with `error = "skipped: <reason>"` and the run
goes on.

A row (a dict; JSON in long_conv.json under "rows", beside "meta"):

    impl               str            implementation name, as above
    B, H, N            int            batch, channels, seq_len
    dtype              str            of u, y, dy ("bfloat16", "float32", ...); k is always float32
    causal             bool
    pass               str            "fwd" or "fwd+bwd"
    bytes              int            by the convention above
    ms                 float | None   median over the timed calls (None when skipped)
    ms_min, ms_max     float | None   fastest and slowest timed call
    eff_tbps           float | None   bytes / ms, in TB/s
    roofline_fraction  float | None   eff_tbps / copy_tbps (None without copy_tbps)
    ratio_to_fft       float | None   fft's ms / ms on the same problem: > 1 is faster than our "fft"
                                      (None on fft itself, or without an fft row)
    ratio_to_anchor    float | None   anchor_jnp_fft's ms / ms on the same problem (None on the
                                      anchor itself, or without it)
    rel_err            float | None   ‖y − ref‖/‖ref‖ of the forward output against our "fft" on float32
                                      copies of the inputs, N ≤ 16384 only (same value on both passes)
    error              str | None     "skipped: <short reason>" or None
"""

from __future__ import annotations

import gc
import itertools
import math
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from longseq.bench.outputs import save_outputs
from longseq.bench.attention import (
    PASSES,
    BenchArgumentError,
    _format_number,
    check_choices,
    check_dtype,
    relative_error,
    run_metadata,
    skipped_lines,
)
from longseq.bench.timing import short_reason, time_calls, time_rows

ANCHOR = "anchor_jnp_fft"
GATED = "gated_"
FFT = "fft"
DIRECT = "direct"
# "direct" materialises a [channels, N, N] matrix; past this it does not fit, so it is not tried.
DIRECT_MAX_SEQ_LEN = 4096
# The correctness column runs our fft on float32 copies of the inputs, only where that is cheap.
REL_ERR_MAX_SEQ_LEN = 16384
DTYPES = ("bfloat16",)
# The copy-bandwidth probe: float32 elements read and written per call.
COPY_PROBE_BYTES = {"cpu": 64 * 2**20}
COPY_PROBE_DEFAULT_BYTES = 2**30  # large enough that launch and sync overheads do not count (256 MiB read 1.5 TB/s on an H100)
COPY_PROBE_ITERS, COPY_PROBE_WARMUP = 10, 2
BYTES_CONVENTION = "read u, read k (float32), write y, each at its dtype's itemsize; x2 for fwd+bwd"

Array = jax.Array
ConvFn = Callable[[Array, Array], Array]


class LongConvShape(NamedTuple):
    """One benchmark problem: u and y are [batch, seq_len, heads] in `dtype`, k is [heads, seq_len] float32."""

    batch: int
    heads: int
    seq_len: int
    dtype: str


# The anchors table (/work/shared/anchors/README.md, "FFT long convolution with jnp.fft").
ANCHOR_SHAPES = (*(LongConvShape(*shape, "bfloat16") for shape in ((8, 768, 1024), (8, 768, 4096), (8, 768, 16384),
                                                                   (4, 768, 65536), (1, 768, 262144),
                                                                   (1, 256, 1048576))),
                 LongConvShape(8, 768, 16384, "float32"), LongConvShape(1, 256, 1048576, "float32"))
# CPU smoke runs (float32): seconds, not minutes. 1000 is not a power of two on purpose.
SMALL_SHAPES = (LongConvShape(2, 8, 256, "float32"), LongConvShape(2, 8, 1000, "float32"))
SHAPE_PRESETS = {"anchors": ANCHOR_SHAPES, "small": SMALL_SHAPES}


# ----------------------------------------------------------------------------------------------
# Pure helpers: bytes, argument checks, which implementations


def long_conv_bytes(shape: LongConvShape, *, pass_: str) -> int:
    """Read u, read k (float32), write y; ×2 for fwd+bwd."""
    batch, heads, seq_len, dtype = shape
    once = 2 * batch * seq_len * heads * jnp.dtype(dtype).itemsize + heads * seq_len * 4
    return once * (2 if pass_ == "fwd+bwd" else 1)


def default_impls() -> tuple[str, ...]:
    """Every name of longseq.ops.LONG_CONV_IMPLS but "auto" (as it is now), then the anchor."""
    from longseq.ops import LONG_CONV_IMPLS

    return (*(name for name in LONG_CONV_IMPLS if name != "auto"), ANCHOR)


def gated_impls() -> tuple[str, ...]:
    """"gated_IMPL" for every IMPL of default_impls() but the anchor (not measured unless named)."""
    return tuple(GATED + name for name in default_impls() if name != ANCHOR)


def check_impls(impls: Sequence[str]) -> tuple[str, ...]:
    if isinstance(impls, str):
        raise BenchArgumentError("impls", f"expected a sequence of names, got the string {impls!r}")
    known = default_impls() + gated_impls()
    impls = tuple(impls)
    for impl in impls:
        if impl not in known:
            raise BenchArgumentError("impls", f"unknown implementation {impl!r}; expected one of {', '.join(known)}")
    duplicates = sorted({name for name in impls if impls.count(name) > 1})
    if duplicates:
        raise BenchArgumentError("impls", f"named more than once: {', '.join(duplicates)}")
    if not impls:
        raise BenchArgumentError("impls", "expected at least one implementation")
    return impls


def _check_one_dtype(argument: str, dtype: Any) -> str:
    try:
        resolved = check_dtype(dtype)
    except BenchArgumentError as error:
        raise BenchArgumentError(argument, error.message)
    if jax.dtypes.canonicalize_dtype(resolved) != resolved:
        raise BenchArgumentError(argument, f"{resolved.name} needs jax_enable_x64")
    return resolved.name


def check_dtypes(dtypes: str | Sequence[str]) -> tuple[str, ...]:
    dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
    if not dtypes:
        raise BenchArgumentError("dtypes", "expected at least one dtype")
    return tuple(dict.fromkeys(_check_one_dtype("dtypes", dtype) for dtype in dtypes))


def check_shapes(shapes: Iterable[Sequence[Any]], dtypes: Sequence[str]) -> tuple[LongConvShape, ...]:
    """(B, H, N) -> one problem per dtype; (B, H, N, dtype) -> itself. Duplicates are an error."""
    def positive(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    checked: list[LongConvShape] = []
    for shape in shapes:
        values = tuple(shape) if isinstance(shape, (tuple, list)) else ()
        if len(values) == 3 and all(positive(x) for x in values):
            checked += [LongConvShape(*values, dtype) for dtype in dtypes]
        elif len(values) == 4 and all(positive(x) for x in values[:3]):
            checked.append(LongConvShape(*values[:3], _check_one_dtype("shapes", values[3])))
        else:
            raise BenchArgumentError("shapes", "expected (batch, heads, seq_len) of positive integers, optionally "
                                     f"with a dtype name fourth, got {shape!r}")
    if not checked:
        raise BenchArgumentError("shapes", "expected at least one shape")
    duplicates = sorted({str(tuple(shape)) for shape in checked if checked.count(shape) > 1})
    if duplicates:
        raise BenchArgumentError("shapes", f"named more than once: {', '.join(duplicates)}")
    return tuple(checked)


def skip_reason(impl: str, shape: LongConvShape, causal: bool) -> str | None:
    """Why a row is not even tried, or None: the anchor non-causal, "direct" past N = 4096."""
    if impl == ANCHOR and not causal:
        return "the anchors' formula (zero-padded to 2N) is causal only"
    if impl in (DIRECT, GATED + DIRECT) and shape.seq_len > DIRECT_MAX_SEQ_LEN:
        return f"O(N²) memory ([H, N, N] matrix), N > {DIRECT_MAX_SEQ_LEN}"
    return None


# ----------------------------------------------------------------------------------------------
# The functions under test


def anchor_jnp_fft(u: Array, k: Array) -> Array:
    """The anchors' formula: u [B, H, N], k [H, N] -> y [B, H, N] in u's dtype, causal, in float32."""
    n = u.shape[-1]
    u32, k32 = u.astype(jnp.float32), k.astype(jnp.float32)
    y = jnp.fft.irfft(jnp.fft.rfft(u32, 2 * n) * jnp.fft.rfft(k32, 2 * n), 2 * n)[..., :n]
    return y.astype(u.dtype)


def conv_function(impl: str, *, causal: bool) -> ConvFn:
    """(u, k) -> y for one implementation, not jitted (the anchor's u and y are [B, H, N])."""
    if impl == ANCHOR:
        return anchor_jnp_fft

    from longseq.ops import gated_long_conv, long_conv

    if impl.startswith(GATED):
        return lambda u, k: gated_long_conv(u, k, u, jnp.ones((u.shape[2],), jnp.float32), causal=causal,
                                            impl=impl[len(GATED):])
    return lambda u, k: long_conv(u, k, causal=causal, impl=impl)


def forward_and_backward(fn: ConvFn) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
    """(u, k, dy) -> (du, dk): the gradient of sum(y · dy), accumulated in float32.

    dy is an argument, not a closure constant, so it is not baked into the compiled program.
    """
    def loss(u, k, dy):
        return jnp.sum(fn(u, k).astype(jnp.float32) * dy.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1))


def make_inputs(shape: LongConvShape, seed: int) -> tuple[Array, Array, Array]:
    """u, dy: [batch, seq_len, heads] in the shape's dtype; k: [heads, seq_len] float32; standard normal."""
    keys = jax.random.split(jax.random.key(seed), 3)
    batch, heads, seq_len, dtype = shape
    u = jax.random.normal(keys[0], (batch, seq_len, heads), dtype)
    k = jax.random.normal(keys[1], (heads, seq_len), jnp.float32)
    dy = jax.random.normal(keys[2], (batch, seq_len, heads), dtype)
    return u, k, dy


def reference_output(u: Array, k: Array, *, causal: bool) -> Array:
    """The ground truth of the correctness column: our "fft" on float32 copies, [batch, seq_len, heads]."""
    from longseq.ops import long_conv

    return jax.jit(lambda u, k: long_conv(u, k, causal=causal, impl=FFT))(u.astype(jnp.float32), k)


def copy_bandwidth(platform: str, *, nbytes: int | None = None) -> dict[str, Any]:
    """The device's copy bandwidth in TB/s: jit(x · 1.5 + 1) over `nbytes` of float32 (default 1 GiB,
    64 MiB on CPU), bytes read + written over the median of COPY_PROBE_ITERS calls.

    x is an argument, so XLA cannot fold or elide the op. Returns {"copy_tbps", "copy_probe"}.
    """
    nbytes = nbytes or COPY_PROBE_BYTES.get(platform, COPY_PROBE_DEFAULT_BYTES)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    timing = time_calls(jax.jit(lambda x: x * 1.5 + 1), x, iters=COPY_PROBE_ITERS, warmup=COPY_PROBE_WARMUP)
    del x
    tbps = 2 * nbytes / (timing.median_ms * 1e-3) / 1e12
    return {"copy_tbps": tbps, "copy_probe": f"jit(x * 1.5 + 1) over {nbytes // 2**20} MiB float32, read + write, "
                                            f"median of {COPY_PROBE_ITERS} calls after {COPY_PROBE_WARMUP}"}


# ----------------------------------------------------------------------------------------------
# Running


def _row(impl: str, shape: LongConvShape, causal: bool, pass_: str) -> dict[str, Any]:
    return {"impl": impl, "B": shape.batch, "H": shape.heads, "N": shape.seq_len, "dtype": shape.dtype,
            "causal": causal, "pass": pass_, "bytes": long_conv_bytes(shape, pass_=pass_),
            "ms": None, "ms_min": None, "ms_max": None, "eff_tbps": None, "roofline_fraction": None,
            "ratio_to_fft": None, "ratio_to_anchor": None, "rel_err": None, "error": None}


def _progress_line(index: int, total: int, row: dict[str, Any]) -> str:
    where = (f"[{index:>{len(str(total))}}/{total}] {row['impl']:<16} B={row['B']} H={row['H']} N={row['N']} "
             f"{row['dtype']:<8} causal={'yes' if row['causal'] else 'no '} {row['pass']:<7}")
    if row["error"]:
        return f"{where} {row['error']}"
    rel_err = f"  rel_err {row['rel_err']:.1e}" if row["rel_err"] is not None else ""
    return f"{where} {row['ms']:10.3f} ms {row['eff_tbps']:8.4f} TB/s{rel_err}"


def add_ratios(rows: Sequence[dict[str, Any]], copy_tbps: float | None) -> list[dict[str, Any]]:
    """Copies of the rows with roofline_fraction = eff_tbps / copy_tbps, ratio_to_fft = fft's ms / ms
    and ratio_to_anchor = anchor_jnp_fft's ms / ms on the same problem (None on the reference itself)."""
    def problem(row):
        return (row["B"], row["H"], row["N"], row["dtype"], row["causal"], row["pass"])

    def ms_of(impl):
        return {problem(row): row["ms"] for row in rows if row["impl"] == impl and row["ms"]}

    references = {"ratio_to_fft": (FFT, ms_of(FFT)), "ratio_to_anchor": (ANCHOR, ms_of(ANCHOR))}
    out = []
    for row in rows:
        measured = row["ms"] is not None
        ratios = {}
        for column, (impl, reference_ms) in references.items():
            reference = reference_ms.get(problem(row))
            ratios[column] = reference / row["ms"] if reference and measured and row["impl"] != impl else None
        fraction = row["eff_tbps"] / copy_tbps if copy_tbps and row["eff_tbps"] is not None else None
        out.append({**row, "roofline_fraction": fraction, **ratios})
    return out


def run_long_conv_bench(shapes: Iterable[Sequence[Any]], impls: Sequence[str] | None = None, *,
                        dtypes: str | Sequence[str] = DTYPES, causal: bool | Sequence[bool] = (True,),
                        passes: Sequence[str] = PASSES, iters: int = 10, warmup: int = 3,
                        out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True,
                        command: str | None = None) -> list[dict[str, Any]]:
    """Measure every implementation on every shape, dtype, causal setting and pass; one dict per row.

    Args:
      shapes: (batch, heads, seq_len) tuples, measured in each of `dtypes`, or (batch, heads, seq_len,
        dtype) tuples, e.g. SHAPE_PRESETS["anchors"] or SHAPE_PRESETS["small"].
      impls: names of longseq.ops.LONG_CONV_IMPLS but "auto", and "anchor_jnp_fft"; None = all of them.
      dtypes: of u, y and dy for the 3-tuple shapes (k is float32).
      causal: which causal settings (a bool or a sequence of bools).
      passes: a subset of ("fwd", "fwd+bwd").
      iters, warmup: timed and untimed calls per row (see longseq.bench.timing.time_calls).
      out_dir: if given, long_conv.json, long_conv.md and long_conv.png are written there.
      seed: of the random inputs.
      verbose: print the copy bandwidth, then one progress line per row as it finishes.
      command: recorded in the JSON metadata (default: this process's command line).

    Returns:
      The rows, in the order measured (schema in the module docstring).

    Raises:
      BenchArgumentError (a ValueError) naming the argument, before anything compiles.
    """
    dtypes = check_dtypes(dtypes)
    problems = check_shapes(shapes, dtypes)
    causal_settings = check_choices("causal", (causal,) if isinstance(causal, bool) else causal, (False, True))
    passes = check_choices("passes", passes, PASSES)
    for name, value, least in (("iters", iters, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise BenchArgumentError(name, f"expected an integer >= {least}, got {value!r}")
    impl_names = check_impls(default_impls() if impls is None else impls)
    platform = jax.devices()[0].platform

    try:
        copy = copy_bandwidth(platform)
        if verbose:
            print(f"copy bandwidth: {copy['copy_tbps']:.3f} TB/s ({copy['copy_probe']})", flush=True)
    except Exception as error:  # noqa: BLE001 - the roofline column is optional
        copy = {"copy_tbps": None, "copy_probe": f"failed: {short_reason(error)}"}
        if verbose:
            print(f"no copy bandwidth (roofline_fraction column): {short_reason(error)}", flush=True)
    gc.collect()

    total = len(problems) * len(causal_settings) * len(impl_names) * len(passes)
    finished = itertools.count(1)

    def report(row: dict[str, Any]) -> None:
        if verbose:
            print(_progress_line(next(finished), total, row), flush=True)

    rows: list[dict[str, Any]] = []
    for shape in problems:
        inputs = make_inputs(shape, seed)
        for is_causal in causal_settings:
            reference = None
            if shape.seq_len <= REL_ERR_MAX_SEQ_LEN and FFT in default_impls():
                try:
                    reference = reference_output(*inputs[:2], causal=is_causal)
                except Exception as error:  # noqa: BLE001 - the column is optional
                    if verbose:
                        print(f"no rel_err column for {tuple(shape)}: {short_reason(error)}", flush=True)
            for impl in impl_names:
                rows.extend(_measure_impl(impl, shape, is_causal, passes, inputs, reference, iters=iters,
                                          warmup=warmup, on_row=report))
            del reference
            gc.collect()
        del inputs
        gc.collect()

    rows = add_ratios(rows, copy["copy_tbps"])
    if out_dir is not None:
        meta = run_metadata(iters=iters, warmup=warmup, seed=seed,
                            command=command if command is not None else shlex.join(sys.argv))
        meta.pop("flop_convention", None)
        meta.update(copy, bytes_convention=BYTES_CONVENTION)
        write_outputs(rows, meta, out_dir)
    return rows


def _measure_impl(impl: str, shape: LongConvShape, causal: bool, passes: Sequence[str],
                  inputs: tuple[Array, Array, Array], reference: Array | None, *, iters: int, warmup: int,
                  on_row: Callable[[dict], None]) -> list[dict[str, Any]]:
    """The rows of one implementation on one shape and causal setting, one per pass.

    Every failure is caught and recorded in the row: one implementation's OOM or unsupported shape
    must not lose the rest of the run.
    """
    rows = [_row(impl, shape, causal, pass_) for pass_ in passes]
    reason = skip_reason(impl, shape, causal)
    forward = grads = None
    u, k, dy = inputs
    if reason is None:
        try:
            if impl == ANCHOR:  # the anchor's layout: [B, H, N]; copies made here, dropped with this call
                u, dy = jnp.swapaxes(u, 1, 2), jnp.swapaxes(dy, 1, 2)
            fn = conv_function(impl, causal=causal)
            forward, grads = jax.jit(fn), jax.jit(forward_and_backward(fn))
        except Exception as error:  # noqa: BLE001 - e.g. out of memory for the transposes
            reason = short_reason(error)

    rel_err = None
    if reason is None and reference is not None:
        try:
            y = forward(u, k)
            if impl.startswith(GATED):  # the same gating of the reference: u ⊙ (k ∗ u + u)
                reference = u.astype(jnp.float32) * (reference + u.astype(jnp.float32))
            rel_err = relative_error(jnp.swapaxes(y, 1, 2) if impl == ANCHOR else y, reference)
            del y
        except Exception:  # noqa: BLE001 - the fwd row below records why
            pass

    return time_rows(rows, {"fwd": (forward, (u, k)), "fwd+bwd": (grads, (u, k, dy))}, reason=reason,
                     iters=iters, warmup=warmup, on_row=on_row, measured={"rel_err": rel_err},
                     rate=lambda row, seconds: {"eff_tbps": row["bytes"] / seconds / 1e12})


# ----------------------------------------------------------------------------------------------
# Outputs: JSON, markdown, plot


def _problem(row: dict[str, Any]) -> tuple:
    return (row["B"], row["H"], row["N"], row["dtype"], row["causal"], row["pass"])


def _problem_cells(problem: tuple) -> list[str]:
    batch, heads, seq_len, dtype, causal, *pass_ = problem
    return [str(batch), str(heads), str(seq_len), dtype, "yes" if causal else "no", *pass_]


def _time_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["error"]:
        return "OOM" if "out of memory" in row["error"] else "—"
    notes = []
    if row["ratio_to_fft"] is not None:
        notes.append(f"{row['ratio_to_fft']:.2f}× fft")
    if row["ratio_to_anchor"] is not None:
        notes.append(f"{row['ratio_to_anchor']:.2f}× anchor")
    text = _format_number(row["ms"])
    return f"{text} ({', '.join(notes)})" if notes else text


def _bandwidth_cell(row: dict[str, Any] | None) -> str:
    if row is None or row["eff_tbps"] is None:
        return ""
    text = f"{row['eff_tbps']:.3g}"
    return f"{text} ({100 * row['roofline_fraction']:.2g}%)" if row["roofline_fraction"] is not None else text


def _table(header: list[str], lines: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(values) + " |" for values in lines)]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per shape/dtype/causal/pass, ms per implementation with (× fft, × anchor).

    Below it, the effective bandwidth (TB/s and % of the measured copy bandwidth), the correctness
    column (‖y − ref‖/‖ref‖ of the forward output against our fft in float32, N ≤ 16384) as a third
    table, and each distinct reason a row was skipped.
    """
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    by_problem: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_problem.setdefault(_problem(row), {})[row["impl"]] = row

    header = ["B", "H", "N", "dtype", "causal", "pass"]
    legend = ("Milliseconds per call, median (× fft = our fft's ms / this ms, × anchor = anchor_jnp_fft's ms / "
              "this ms: > 1 is faster)")
    if any(row["error"] for row in rows):
        legend += "; — = skipped, reasons below"
    lines = [legend + ".\n"]
    lines += _table([*header, *impls], ([*_problem_cells(problem), *(_time_cell(cells.get(impl)) for impl in impls)]
                                        for problem, cells in by_problem.items()))

    measured = [impl for impl in impls if any(row["impl"] == impl and row["eff_tbps"] is not None for row in rows)]
    if measured:
        lines += ["", "Effective bandwidth, TB/s (bytes that must move / time; % of the copy bandwidth measured "
                  "in the same run):", ""]
        lines += _table([*header, *measured], ([*_problem_cells(problem),
                                                *(_bandwidth_cell(cells.get(impl)) for impl in measured)]
                                               for problem, cells in by_problem.items()))

    rel_errs: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["rel_err"] is not None:
            rel_errs.setdefault(_problem(row)[:5], {})[row["impl"]] = row["rel_err"]
    if rel_errs:
        checked = [impl for impl in impls if any(impl in errs for errs in rel_errs.values())]
        lines += ["", "Relative error of the forward output against our fft on float32 inputs, "
                  "‖y − ref‖/‖ref‖:", ""]
        lines += _table([*header[:5], *checked], ([*_problem_cells(problem),
                                                   *(f"{errs[impl]:.1e}" if impl in errs else "" for impl in checked)]
                                                  for problem, errs in rel_errs.items()))

    lines += skipped_lines(rows)
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ms against N (log-log), one line per implementation (and dtype, causal setting), one panel per pass."""
    # A bare Figure (no pyplot) uses the Agg canvas and leaves the global backend alone.
    from matplotlib.figure import Figure

    panels = [pass_ for pass_ in PASSES if any(row["pass"] == pass_ for row in rows)]
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    variants = list(dict.fromkeys((row["dtype"], row["causal"]) for row in rows))
    several_dtypes = len({dtype for dtype, _ in variants}) > 1
    both_causal = len({causal for _, causal in variants}) > 1
    styles = ("-", "--", ":", "-.")
    figure = Figure(figsize=(6 * max(len(panels), 1), 4.2))
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False).ravel()
    for axis, pass_ in zip(axes, panels):
        for color, impl in enumerate(impls):
            for style, (dtype, causal) in enumerate(variants):
                points = sorted((row["N"], row["ms"]) for row in rows
                                if row["impl"] == impl and row["dtype"] == dtype and row["causal"] == causal
                                and row["pass"] == pass_ and row["ms"] is not None)
                if not points:
                    continue
                label = impl + (f" {dtype}" if several_dtypes else "") + \
                    ("" if not both_causal else " causal" if causal else " non-causal")
                axis.plot(*zip(*points), styles[style % len(styles)], marker="o", color=f"C{color % 10}",
                          label=label, markersize=4)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set(xlabel="sequence length N", ylabel="ms per call (median)", title=pass_)
        axis.grid(alpha=0.3, which="both")
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def write_outputs(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """long_conv.json ({"meta", "rows"}), long_conv.md and long_conv.png in out_dir (created)."""
    copy_tbps = meta.get("copy_tbps")
    copy = f"{copy_tbps:.3f} TB/s" if isinstance(copy_tbps, float) and math.isfinite(copy_tbps) else "not measured"
    header = (f"# Long convolution benchmark\n\n{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, "
              f"{meta['date']}; median of {meta['iters']} timed calls after {meta['warmup']} warm-up calls.\n"
              f"Bytes: {meta['bytes_convention']}. Copy bandwidth: {copy} ({meta.get('copy_probe')}).\n\n"
              f"`{meta['command']}`\n\n")
    return save_outputs("long_conv", rows, meta, header + format_table(rows), plot, out_dir)
