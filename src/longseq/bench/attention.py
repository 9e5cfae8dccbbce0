"""Attention benchmark: `longseq.ops.attention` against what a JAX user gets without longseq.

One row per shape × causal × pass × implementation, all measured in one process on the same inputs:

    q, k, v, dout: [batch, seq_len, heads, head_dim], random normal, generated once per shape
    fwd:       jit(attention)(q, k, v) -> out
    fwd+bwd:   jit(grad(sum(out · dout) in float32, wrt (q, k, v)))(q, k, v, dout)

Implementations (names as they appear in the rows):

    any name in longseq.ops.ATTENTION_IMPLS   longseq.ops.attention(..., impl=name), e.g. "pallas", "reference"
    "pallas[NAME]"                            longseq.ops.attention(..., impl="pallas", flash=FlashAttentionConfig
                                              with the overrides of flash variant NAME): tile-size tuning
    "anchor_cudnn"                            jax.nn.dot_product_attention(..., implementation="cudnn")
    "anchor_xla"                              jax.nn.dot_product_attention(..., implementation="xla")
    "anchor_jax_pallas_mha"                   jax.experimental.pallas.ops.gpu.attention.mha, default block sizes

The anchors are called straight from the libraries, never through our wrapper, exactly as in
/work/shared/anchors (whose table this reproduces). FLOPs follow the anchors' convention:
4·B·H·N²·D, half of that when causal, ×3.5 for forward+backward.

A row that cannot run (a GPU-only anchor on CPU, a dense implementation past N = 16384, out of
memory, an unsupported dtype) is recorded with `error = "skipped: <reason>"` and the run goes on.

A row (a dict; JSON in attention.json under "rows", beside "meta"):

    impl            str            implementation name, as above
    B, N, H, D      int            batch, seq_len, heads, head_dim
    dtype           str            of q, k, v, dout ("bfloat16", "float32", ...)
    causal          bool
    pass            str            "fwd" or "fwd+bwd"
    flash           dict | None    the FlashAttentionConfig overrides of a "pallas[NAME]" row
    flops           float          by the convention above
    ms              float | None   median over the timed calls (None when skipped)
    ms_min, ms_max  float | None   fastest and slowest timed call
    tflops          float | None   flops / ms
    ratio_to_cudnn  float | None   tflops / anchor_cudnn's tflops on the same problem (None without it)
    rel_err         float | None   ‖out − ref‖/‖ref‖ of the forward output against the float32 dense
                                   reference, N ≤ 4096 only (same value on the fwd and fwd+bwd rows)
    error           str | None     "skipped: <short reason>" or None
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import math
import platform as python_platform
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from longseq.bench.outputs import attention_problem_lines, save_outputs
from longseq.bench.timing import short_reason, time_rows

ANCHOR_IMPLS = ("anchor_cudnn", "anchor_xla", "anchor_jax_pallas_mha")
PASSES = ("fwd", "fwd+bwd")
CUDNN = "anchor_cudnn"

# Dense implementations hold the [batch, heads, N, N] scores in memory; past this they do not fit
# (the anchors recorded XLA as OOM at N = 32768), so their rows are skipped without trying.
# ("xla" is longseq.ops' wrapper of the same jax.nn call.)
DENSE_IMPLS = ("anchor_xla", "reference", "xla")
DENSE_MAX_SEQ_LEN = 16384
# The correctness column compares against the dense float32 reference, only where that is cheap.
REL_ERR_MAX_SEQ_LEN = 4096
# Forward+backward costs 3.5 forwards in the anchors' convention (2.5 for the backward's five matmuls).
FWD_BWD_FLOP_FACTOR = 3.5

Array = jax.Array
AttentionFn = Callable[[Array, Array, Array], Array]


class AttentionShape(NamedTuple):
    """One benchmark shape; q, k, v are all [batch, seq_len, heads, head_dim]."""

    batch: int
    seq_len: int
    heads: int
    head_dim: int


# The anchors table (/work/shared/anchors/README.md): bf16, head_dim 128.
ANCHOR_SHAPES = (AttentionShape(4, 4096, 16, 128), AttentionShape(1, 16384, 16, 128),
                 AttentionShape(1, 32768, 16, 128), AttentionShape(1, 65536, 8, 128))
# CPU smoke runs (float32): seconds, not minutes.
SMALL_SHAPES = (AttentionShape(1, 256, 2, 64), AttentionShape(1, 512, 2, 64))
SHAPE_PRESETS = {"anchors": ANCHOR_SHAPES, "small": SMALL_SHAPES}
PRESET_DTYPES = {"anchors": "bfloat16", "small": "float32"}


class BenchArgumentError(ValueError):
    """A bad benchmark argument, caught before anything compiles; `argument` is the parameter's name."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


# ----------------------------------------------------------------------------------------------
# Pure helpers: FLOPs, argument checks, which implementations


def attention_flops(shape: AttentionShape, *, causal: bool, pass_: str) -> float:
    """4·B·H·N²·D, halved when causal, ×3.5 for fwd+bwd (the anchors' convention)."""
    batch, seq_len, heads, head_dim = shape
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    if causal:
        flops /= 2
    if pass_ == "fwd+bwd":
        flops *= FWD_BWD_FLOP_FACTOR
    return flops


def default_impls(platform: str) -> tuple[str, ...]:
    """Our kernel and the three anchors on GPU; the reference and XLA elsewhere.

    Ops implementations that longseq.ops does not offer yet (e.g. "pallas" before it lands) are left
    out of the default rather than failing it; naming them explicitly is an error.
    """
    from longseq.ops import ATTENTION_IMPLS

    if platform == "gpu":
        wanted = ("pallas", "pallas_mosaic_gpu", "anchor_cudnn", "anchor_xla", "anchor_jax_pallas_mha")
    else:
        wanted = ("reference", "anchor_xla")
    return tuple(name for name in wanted if name in ANCHOR_IMPLS or name in ATTENTION_IMPLS)


def variant_impl_name(variant: str) -> str:
    return f"pallas[{variant}]"


def check_shapes(shapes: Iterable[Sequence[int]]) -> tuple[AttentionShape, ...]:
    checked = []
    for shape in shapes:
        values = tuple(shape)
        if len(values) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                       for x in values):
            raise BenchArgumentError("shapes", "expected (batch, seq_len, heads, head_dim) of positive "
                                     f"integers, got {shape!r}")
        checked.append(AttentionShape(*values))
    if not checked:
        raise BenchArgumentError("shapes", "expected at least one shape")
    return tuple(checked)


def check_dtype(dtype: Any) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise BenchArgumentError("dtype", f"expected a floating dtype name such as 'bfloat16', got {dtype!r}")
    if not jnp.issubdtype(resolved, jnp.floating):
        raise BenchArgumentError("dtype", f"expected a floating dtype, got {dtype!r}")
    return resolved


def check_impls(impls: Sequence[str], flash_variants: Mapping[str, Mapping[str, int]]) -> tuple[str, ...]:
    """The implementations to measure: `impls` in order, then "pallas[NAME]" for each flash variant."""
    from longseq.ops import ATTENTION_IMPLS

    if isinstance(impls, str):
        raise BenchArgumentError("impls", f"expected a sequence of names, got the string {impls!r}")
    known = (*ATTENTION_IMPLS, *ANCHOR_IMPLS)
    for impl in impls:
        if impl not in known:
            raise BenchArgumentError("impls", f"unknown implementation {impl!r}; expected one of "
                                     f"{', '.join(known)}; pallas[NAME] rows come from the flash variants")
    if flash_variants and "pallas" not in ATTENTION_IMPLS:
        raise BenchArgumentError("flash_variants", "longseq.ops.ATTENTION_IMPLS has no 'pallas' "
                                 f"implementation to configure (it has {', '.join(ATTENTION_IMPLS)})")
    names = [*impls, *(variant_impl_name(variant) for variant in flash_variants)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchArgumentError("impls", f"named more than once: {', '.join(duplicates)}")
    if not names:
        raise BenchArgumentError("impls", "expected at least one implementation")
    return tuple(names)


def check_choices(argument: str, values: Iterable[Any], allowed: Sequence[Any]) -> tuple[Any, ...]:
    values = tuple(values)
    bad = [value for value in values if value not in allowed or type(value) is not type(allowed[0])]
    if bad or not values:
        raise BenchArgumentError(argument, f"expected a non-empty subset of {allowed}, got {values!r}")
    return values


def build_flash_configs(flash_variants: Mapping[str, Mapping[str, int]] | None) -> dict[str, Any]:
    """One `longseq.config.FlashAttentionConfig` per variant: the default with the variant's overrides.

    Imported only here, so a run without flash variants never needs it. Unknown fields and values the
    config's own validation rejects raise BenchArgumentError naming the variant.
    """
    if not flash_variants:
        return {}
    try:
        from longseq.config import FlashAttentionConfig
    except ImportError:
        raise BenchArgumentError("flash_variants", "longseq.config has no FlashAttentionConfig to build "
                                 "the variants from")
    fields = [field.name for field in dataclasses.fields(FlashAttentionConfig)]
    configs = {}
    for variant, overrides in flash_variants.items():
        if not isinstance(variant, str) or not variant or not all(c.isalnum() or c in "_-." for c in variant):
            raise BenchArgumentError("flash_variants", "expected variant names of letters, digits, '_', '-' "
                                     f"or '.', got {variant!r}")
        for key, value in overrides.items():
            if key not in fields:
                raise BenchArgumentError("flash_variants", f"{variant}: unknown FlashAttentionConfig field "
                                         f"{key!r}; expected one of {', '.join(fields)}")
            if not isinstance(value, int) or isinstance(value, bool):
                raise BenchArgumentError("flash_variants", f"{variant}: {key} expected an integer, got {value!r}")
        try:
            configs[variant] = dataclasses.replace(FlashAttentionConfig(), **overrides)
        except (TypeError, ValueError) as error:
            raise BenchArgumentError("flash_variants", f"{variant}: {error}")
    return configs


def skip_reason(impl: str, shape: AttentionShape, platform: str, dtype: Any = "bfloat16") -> str | None:
    """Why a row is not even tried, or None: GPU-only anchors off a GPU, dense ones past 16K."""
    if impl in ("anchor_cudnn", "cudnn", "anchor_jax_pallas_mha") and platform != "gpu":
        needs = "Triton" if impl == "anchor_jax_pallas_mha" else "cuDNN"
        return f"needs a GPU ({needs}); platform is {platform}"
    if impl == "pallas_mosaic_gpu":
        from longseq.ops.attention_hopper import supports
        from longseq.ops.mosaic_gpu import on_hopper

        if not on_hopper():
            return f"needs a Hopper GPU (Mosaic GPU kernels); platform is {platform}"
        return supports(dtype, shape.head_dim)
    if impl in DENSE_IMPLS and shape.seq_len > DENSE_MAX_SEQ_LEN:
        return f"dense N² scores, N > {DENSE_MAX_SEQ_LEN}"
    return None


# ----------------------------------------------------------------------------------------------
# The functions under test


def attention_function(impl: str, *, causal: bool, head_dim: int,
                       flash_configs: Mapping[str, Any]) -> AttentionFn:
    """(q, k, v) -> out [batch, seq_len, heads, head_dim] for one implementation, not jitted."""
    if impl == "anchor_cudnn" or impl == "anchor_xla":
        implementation = "cudnn" if impl == "anchor_cudnn" else "xla"
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=implementation)
    if impl == "anchor_jax_pallas_mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        scale = 1.0 / math.sqrt(head_dim)
        return lambda q, k, v: mha(q, k, v, segment_ids=None, sm_scale=scale, causal=causal)

    from longseq.ops import attention

    if impl.startswith("pallas[") and impl.endswith("]"):
        flash = flash_configs[impl[len("pallas["):-1]]
        return lambda q, k, v: attention(q, k, v, causal=causal, impl="pallas", flash=flash)[0]
    return lambda q, k, v: attention(q, k, v, causal=causal, impl=impl)[0]


def forward_and_backward(fn: AttentionFn) -> Callable[[Array, Array, Array, Array], tuple[Array, Array, Array]]:
    """(q, k, v, dout) -> (dq, dk, dv): the gradient of sum(out · dout), accumulated in float32.

    dout is an argument, not a closure constant, so it is not baked into the compiled program.
    """
    def loss(q, k, v, dout):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def make_inputs(shape: AttentionShape, dtype: jnp.dtype, seed: int) -> tuple[Array, Array, Array, Array]:
    """q, k, v, dout: [batch, seq_len, heads, head_dim] standard normal in `dtype` (never zeros)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, tuple(shape), dtype) for key in keys)


def relative_error(out: Array, reference: Array) -> float:
    """‖out − reference‖ / ‖reference‖ in float32."""
    out, reference = out.astype(jnp.float32), reference.astype(jnp.float32)
    return float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))


def reference_output(q: Array, k: Array, v: Array, *, causal: bool) -> Array:
    """The ground truth of the correctness column: longseq's dense reference on float32 copies."""
    from longseq.ops import attention

    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, impl="reference")[0])(*upcast)


# ----------------------------------------------------------------------------------------------
# Running


def _row(impl: str, shape: AttentionShape, dtype: jnp.dtype, causal: bool, pass_: str,
         flash_variants: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    variant = impl[len("pallas["):-1] if impl.startswith("pallas[") else None
    return {"impl": impl, "B": shape.batch, "N": shape.seq_len, "H": shape.heads, "D": shape.head_dim,
            "dtype": dtype.name, "causal": causal, "pass": pass_,
            "flash": dict(flash_variants[variant]) if variant is not None else None,
            "flops": attention_flops(shape, causal=causal, pass_=pass_),
            "ms": None, "ms_min": None, "ms_max": None, "tflops": None,
            "ratio_to_cudnn": None, "rel_err": None, "error": None}


def _progress_line(index: int, total: int, row: dict[str, Any]) -> str:
    where = (f"[{index:>{len(str(total))}}/{total}] {row['impl']:<24} B={row['B']} N={row['N']} H={row['H']} D={row['D']} "
             f"causal={'yes' if row['causal'] else 'no '} {row['pass']:<7}")
    if row["error"]:
        return f"{where} {row['error']}"
    rel_err = f"  rel_err {row['rel_err']:.1e}" if row["rel_err"] is not None else ""
    return f"{where} {row['ms']:10.3f} ms {row['tflops']:9.3f} TFLOP/s{rel_err}"


def add_cudnn_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows with ratio_to_cudnn = tflops / anchor_cudnn's tflops on the same problem."""
    def problem(row):
        return (row["B"], row["N"], row["H"], row["D"], row["dtype"], row["causal"], row["pass"])

    cudnn = {problem(row): row["tflops"] for row in rows if row["impl"] == CUDNN and row["tflops"]}
    out = []
    for row in rows:
        reference = cudnn.get(problem(row))
        ratio = row["tflops"] / reference if reference and row["tflops"] is not None else None
        out.append({**row, "ratio_to_cudnn": ratio})
    return out


def run_attention_bench(shapes: Iterable[Sequence[int]], impls: Sequence[str] | None = None, *,
                        causal: bool | Sequence[bool] = (False, True), passes: Sequence[str] = PASSES,
                        dtype: Any = "bfloat16", iters: int = 10, warmup: int = 3,
                        flash_variants: Mapping[str, Mapping[str, int]] | None = None,
                        out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True,
                        command: str | None = None) -> list[dict[str, Any]]:
    """Measure every implementation on every shape, causal setting and pass; one dict per row.

    Args:
      shapes: (batch, seq_len, heads, head_dim) tuples, e.g. ANCHOR_SHAPES or SMALL_SHAPES.
      impls: names in longseq.ops.ATTENTION_IMPLS or ANCHOR_IMPLS; None = default_impls(platform).
      causal: which causal settings (a bool or a sequence of bools).
      passes: a subset of ("fwd", "fwd+bwd").
      dtype: of q, k, v and dout (e.g. "bfloat16", "float32").
      iters, warmup: timed and untimed calls per row (see longseq.bench.timing.time_calls).
      flash_variants: {name: {FlashAttentionConfig field: int}}; each adds an implementation
        "pallas[name]" = ops.attention(impl="pallas", flash=replace(FlashAttentionConfig(), **overrides)).
      out_dir: if given, attention.json, attention.md and attention.png are written there.
      seed: of the random inputs.
      verbose: print one progress line per row as it finishes.
      command: recorded in the JSON metadata (default: this process's command line).

    Returns:
      The rows, in the order measured (schema in the module docstring).

    Raises:
      BenchArgumentError (a ValueError) naming the argument, before anything compiles.
    """
    shapes = check_shapes(shapes)
    dtype = check_dtype(dtype)
    causal_settings = check_choices("causal", (causal,) if isinstance(causal, bool) else causal,
                                    (False, True))
    passes = check_choices("passes", passes, PASSES)
    for name, value, least in (("iters", iters, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < least:
            raise BenchArgumentError(name, f"expected an integer >= {least}, got {value!r}")
    flash_variants = dict(flash_variants or {})
    platform = jax.devices()[0].platform
    impl_names = check_impls(default_impls(platform) if impls is None else impls, flash_variants)
    flash_configs = build_flash_configs(flash_variants)

    total = len(shapes) * len(causal_settings) * len(impl_names) * len(passes)
    finished = itertools.count(1)

    def report(row: dict[str, Any]) -> None:
        if verbose:
            print(_progress_line(next(finished), total, row), flush=True)

    rows: list[dict[str, Any]] = []
    for shape in shapes:
        q, k, v, dout = make_inputs(shape, dtype, seed)
        for is_causal in causal_settings:
            reference = None
            if shape.seq_len <= REL_ERR_MAX_SEQ_LEN:
                try:
                    reference = reference_output(q, k, v, causal=is_causal)
                except Exception as error:  # noqa: BLE001 - the column is optional
                    if verbose:
                        print(f"no rel_err column for {shape}: {short_reason(error)}", flush=True)
            for impl in impl_names:
                rows.extend(_measure_impl(impl, shape, dtype, is_causal, passes, (q, k, v, dout), reference,
                                          platform=platform, flash_configs=flash_configs,
                                          flash_variants=flash_variants, iters=iters, warmup=warmup,
                                          on_row=report))
            del reference
            gc.collect()
        del q, k, v, dout
        gc.collect()

    rows = add_cudnn_ratios(rows)
    if out_dir is not None:
        meta = run_metadata(iters=iters, warmup=warmup, seed=seed,
                            command=command if command is not None else shlex.join(sys.argv))
        write_outputs(rows, meta, out_dir)
    return rows


def _measure_impl(impl: str, shape: AttentionShape, dtype: jnp.dtype, causal: bool, passes: Sequence[str],
                  inputs: tuple[Array, Array, Array, Array], reference: Array | None, *, platform: str,
                  flash_configs: Mapping[str, Any], flash_variants: Mapping[str, Mapping[str, int]],
                  iters: int, warmup: int, on_row: Callable[[dict], None]) -> list[dict[str, Any]]:
    """The rows of one implementation on one shape and causal setting, one per pass.

    Every failure is caught and recorded in the row: one implementation's OOM or missing feature
    must not lose the rest of the run.
    """
    q, k, v, dout = inputs
    rows = [_row(impl, shape, dtype, causal, pass_, flash_variants) for pass_ in passes]
    reason = skip_reason(impl, shape, platform, dtype)
    forward = grads = None
    if reason is None:
        try:
            fn = attention_function(impl, causal=causal, head_dim=shape.head_dim, flash_configs=flash_configs)
            forward, grads = jax.jit(fn), jax.jit(forward_and_backward(fn))
        except Exception as error:  # noqa: BLE001 - e.g. an anchor whose module fails to import
            reason = short_reason(error)

    rel_err = None
    if reason is None and reference is not None:
        try:
            rel_err = relative_error(forward(q, k, v), reference)
        except Exception:  # noqa: BLE001 - the fwd row below records why
            pass

    return time_rows(rows, {"fwd": (forward, (q, k, v)), "fwd+bwd": (grads, (q, k, v, dout))}, reason=reason,
                     iters=iters, warmup=warmup, on_row=on_row, measured={"rel_err": rel_err},
                     rate=lambda row, seconds: {"tflops": row["flops"] / seconds / 1e12})


# ----------------------------------------------------------------------------------------------
# Outputs: JSON, markdown, plot


def run_metadata(*, iters: int, warmup: int, seed: int, command: str) -> dict[str, Any]:
    device = jax.devices()[0]
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        jaxlib_version = None
    return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib_version, "python": python_platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, "iters": iters, "warmup": warmup, "seed": seed,
            "flop_convention": "4*B*H*N^2*D, /2 when causal, x3.5 for fwd+bwd"}


def _format_number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["error"]:
        return "OOM" if "out of memory" in row["error"] else "—"
    text = _format_number(row["tflops"])
    if row["ratio_to_cudnn"] is not None and row["impl"] != CUDNN:
        text += f" ({row['ratio_to_cudnn']:.2f}×)"
    return text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per shape/causal/pass, TFLOP/s per implementation with (× cuDNN).

    Below it, the correctness column (‖out − ref‖/‖ref‖ of the forward output, N ≤ 4096) as a
    second table, and each distinct reason a row was skipped.
    """
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    lines = attention_problem_lines(rows, _cell)
    legend = "TFLOP/s (× anchor_cudnn on the same problem)"
    if any(row["error"] for row in rows):
        legend += "; — = skipped, reasons below"
    lines.insert(0, legend + ".\n")

    rel_errs: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["rel_err"] is not None:
            key = (row["B"], row["N"], row["H"], row["D"], row["dtype"], row["causal"])
            rel_errs.setdefault(key, {})[row["impl"]] = row["rel_err"]
    if rel_errs:
        measured = [impl for impl in impls if any(impl in errs for errs in rel_errs.values())]
        lines += ["", "Relative error of the forward output against the float32 reference, ‖out − ref‖/‖ref‖:", "",
                  "| B | N | H | D | dtype | causal | " + " | ".join(measured) + " |",
                  "|" + "---|" * (6 + len(measured))]
        for (batch, seq_len, heads, head_dim, dtype, causal), errs in rel_errs.items():
            values = [str(batch), str(seq_len), str(heads), str(head_dim), dtype, "yes" if causal else "no",
                      *(f"{errs[impl]:.1e}" if impl in errs else "" for impl in measured)]
            lines.append("| " + " | ".join(values) + " |")

    lines += skipped_lines(rows)
    return "\n".join(lines) + "\n"


def skipped_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines listing each (impl, skip reason) once with its row count; [] when none skipped."""
    reasons: dict[tuple[str, str], int] = {}
    for row in rows:
        if row["error"]:
            reasons[(row["impl"], row["error"])] = reasons.get((row["impl"], row["error"]), 0) + 1
    if not reasons:
        return []
    return ["", "Skipped:", *(f"- {impl}: {error} ({count} row{'s' if count > 1 else ''})"
                              for (impl, error), count in reasons.items())]


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """TFLOP/s against N, one line per implementation, one panel per (causal, pass); saved as PNG."""
    # A bare Figure (no pyplot) uses the Agg canvas and leaves the global backend alone.
    from matplotlib.figure import Figure

    panels = [(causal, pass_) for causal in (False, True) for pass_ in PASSES
              if any(row["causal"] == causal and row["pass"] == pass_ for row in rows)]
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    columns = min(len(panels), 2) or 1
    figure = Figure(figsize=(6 * columns, 4.2 * math.ceil(max(len(panels), 1) / columns)))
    axes = figure.subplots(math.ceil(max(len(panels), 1) / columns), columns, squeeze=False).ravel()
    for axis, (causal, pass_) in zip(axes, panels):
        for impl in impls:
            points = sorted((row["N"], row["tflops"]) for row in rows
                            if row["impl"] == impl and row["causal"] == causal and row["pass"] == pass_
                            and row["tflops"] is not None)
            if points:
                axis.plot(*zip(*points), "o-", label=impl, markersize=4)
        axis.set_xscale("log", base=2)
        axis.set_ylim(bottom=0)
        axis.set(xlabel="sequence length N", ylabel="TFLOP/s",
                 title=f"{'causal' if causal else 'non-causal'}, {pass_}")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def write_outputs(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """attention.json ({"meta", "rows"}), attention.md and attention.png in out_dir (created)."""
    header = (f"# Attention benchmark\n\n{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, "
              f"{meta['date']}; median of {meta['iters']} timed calls after {meta['warmup']} warm-up calls.\n"
              f"FLOPs: {meta['flop_convention']}.\n\n`{meta['command']}`\n\n")
    return save_outputs("attention", rows, meta, header + format_table(rows), plot, out_dir)
