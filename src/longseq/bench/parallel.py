"""Sequence-parallel attention benchmark: `longseq.parallel.attention` on all visible devices.

One row per sequence length × causal × pass × implementation, all measured in one process on the
same inputs (P = jax.device_count()):

    q, k, v, dout: [batch, seq_len, heads, head_dim], random normal, generated once per seq_len
                   and put on the devices sequence-sharded (NamedSharding over (seq_q, seq_kv))
    fwd:       jit(attention)(q, k, v) -> out
    fwd+bwd:   jit(grad(sum(out · dout) in float32, wrt (q, k, v)))(q, k, v, dout)

Implementations (names as they appear in the rows):

    "sp_STRATEGY[PqxPkv]"      longseq.parallel.attention(..., strategy=STRATEGY, impl=block_impl) on
                               Mesh(devices.reshape(1, Pq, Pkv), ("data", "seq_q", "seq_kv")).
                               "sp_STRATEGY" alone means its default grids: every Pq·Pkv = P for
                               attention2d, usp and double_ring, 1×P for the others.
    "sp_attention2d+kept[..]"  the same with keep_gathered=True: the gathered blocks are kept for the
                               backward instead of gathered again (O(N/Pkv) K/V memory per device).
    "single_device_IMPL"       longseq.ops.attention(..., impl=IMPL) on ONE device, whole problem
                               (the baseline of the scaling efficiency; IMPL = block_impl by default)
    "anchor_allgather_cudnn"   all-gather K/V over the P devices, then
                               jax.nn.dot_product_attention(implementation="cudnn") per shard inside
                               shard_map, as in /work/shared/anchors (sp2_anchor.py). Non-causal only:
                               cuDNN takes no global causal offset.
    "anchor_ringattention"     ring_attention of the `ringattention` package (0.1.2, the ring attention
                               a JAX user can pip-install: blockwise attention in plain JAX, 1024-token
                               chunks, float32 logits), in shard_map over the P devices, with the
                               settings of sp2_anchor.py. Skipped when the package is not installed.

The per-block implementation (block_impl) is "cudnn" on GPUs and "reference" elsewhere. FLOPs are
the whole problem's, in the anchors' convention (4·B·H·N²·D, /2 causal, ×3.5 fwd+bwd), so P devices
at perfect scaling show P times the single-device TFLOP/s.

A row that cannot run (out of memory, heads not divisible for ulysses, cuDNN off a GPU) is recorded
with `error = "skipped: <reason>"` and the run goes on.

A row (a dict; JSON in parallel.json under "rows", beside "meta"):

    impl                      str            as above
    strategy                  str | None     of an sp_* row
    keep_gathered             bool           attention2d keeping its gathered blocks (the +kept rows)
    order                     str | None     of an sp_* row's sequence: "zigzag" or "natural" (run_parallel_bench's order)
    grid                      str | None     "PqxPkv" of an sp_* row, "1xP" for the all-gather anchor
    devices                   int            devices the row runs on (1 for single_device_*)
    block_impl                str | None     the longseq.ops implementation inside (None for the anchor)
    B, N, H, D                int            batch, seq_len, heads, head_dim
    dtype                     str            of q, k, v, dout
    causal                    bool
    pass                      str            "fwd" or "fwd+bwd"
    flops                     float          by the convention above
    ms, ms_min, ms_max        float | None   median, fastest and slowest timed call (None when skipped)
    tflops                    float | None   flops / ms
    scaling_efficiency        float | None   tflops / (devices × the single-device baseline's tflops on
                                             the same problem); None on the baseline itself or without it
    ratio_to_allgather_cudnn  float | None   tflops / anchor_allgather_cudnn's tflops on the same problem
    ratio_to_ringattention    float | None   tflops / anchor_ringattention's tflops on the same problem
    error                     str | None     "skipped: <short reason>" or None
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longseq.bench.outputs import attention_problem_lines, save_outputs
from longseq.bench.attention import (
    PASSES,
    AttentionShape,
    BenchArgumentError,
    _format_number,
    attention_flops,
    check_choices,
    check_dtype,
    forward_and_backward,
    make_inputs,
    plot,
    run_metadata,
    skipped_lines,
)
from longseq.bench.timing import short_reason, time_rows
from longseq.parallel.attention import BALANCED_IN_PLACE

ALLGATHER_CUDNN = "anchor_allgather_cudnn"
RINGATTENTION = "anchor_ringattention"
SINGLE_DEVICE_PREFIX = "single_device_"
MESH_AXES = ("data", "seq_q", "seq_kv")
SEQ_AXES = ("seq_q", "seq_kv")


class ParallelPreset(NamedTuple):
    """The problem sizes of a preset: one shape per sequence length."""

    batch: int
    seq_lens: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: str


# The 2-GPU anchors (/work/shared/anchors/README.md) go to N = 131072; past it is where sequence
# parallelism has to earn its keep. "small" is a CPU smoke run: 8 heads so ulysses fits 8 devices.
SHAPE_PRESETS = {"default": ParallelPreset(1, (65536, 131072, 262144), 16, 128, "bfloat16"),
                 "small": ParallelPreset(1, (256,), 8, 32, "float32")}

_SP_NAME = re.compile(r"sp_(?P<strategy>\w+?)(?P<kept>\+kept)?(\[(?P<rows>\d+)x(?P<cols>\d+)\])?")

Array = jax.Array


class Implementation(NamedTuple):
    """One implementation to measure, resolved from its name."""

    name: str
    kind: str                      # "sp", "single_device" or "anchor"
    strategy: str | None = None
    grid: tuple[int, int] | None = None
    block_impl: str | None = None
    keep_gathered: bool = False


# ----------------------------------------------------------------------------------------------
# Pure helpers: names, grids, argument checks


def sp_impl_name(strategy: str, grid: tuple[int, int], keep_gathered: bool = False) -> str:
    return f"sp_{strategy}{'+kept' if keep_gathered else ''}[{grid[0]}x{grid[1]}]"


def default_grids(strategy: str, devices: int) -> tuple[tuple[int, int], ...]:
    """Every factorisation Pq·Pkv = P (1×P first) for the two-axis strategies (attention2d, usp,
    double_ring), 1×P for the others: the grids the cost model considers."""
    from longseq.parallel import cost

    return cost.grids(strategy, devices)


def default_block_impl(platform: str) -> str:
    return "cudnn" if platform == "gpu" else "reference"


def default_impls(platform: str, block_impl: str) -> tuple[str, ...]:
    """Every strategy on its default grids, the single-device baseline, and (on GPU) the cuDNN anchor."""
    from longseq.parallel import STRATEGIES

    names = [f"sp_{strategy}" for strategy in STRATEGIES] + [SINGLE_DEVICE_PREFIX + block_impl]
    if platform == "gpu":
        names += [ALLGATHER_CUDNN, RINGATTENTION]
    return tuple(names)


def resolve_impls(impls: Sequence[str], *, devices: int, block_impl: str) -> tuple[Implementation, ...]:
    """Names -> Implementations, "sp_STRATEGY" expanded to its default grids; errors name the impl."""
    from longseq.ops import ATTENTION_IMPLS
    from longseq.parallel import STRATEGIES

    if isinstance(impls, str):
        raise BenchArgumentError("impls", f"expected a sequence of names, got the string {impls!r}")
    expected = (f"sp_STRATEGY or sp_STRATEGY[PqxPkv] with STRATEGY in {', '.join(STRATEGIES)} "
                f"(sp_attention2d+kept… for attention2d keeping its gathered blocks); "
                f"single_device_IMPL with IMPL in {', '.join(ATTENTION_IMPLS)}; {ALLGATHER_CUDNN}; {RINGATTENTION}")
    resolved: list[Implementation] = []
    for name in impls:
        match = _SP_NAME.fullmatch(name) if isinstance(name, str) else None
        if match and match["strategy"] in STRATEGIES and (match["kept"] is None or match["strategy"] == "attention2d"):
            strategy, kept = match["strategy"], match["kept"] is not None
            if match["rows"] is None:
                grids = default_grids(strategy, devices)
            else:
                grids = ((int(match["rows"]), int(match["cols"])),)
                if grids[0][0] * grids[0][1] != devices or min(grids[0]) < 1:
                    raise BenchArgumentError("impls", f"{name!r}: the grid Pq×Pkv must multiply to the "
                                             f"{devices} visible device(s)")
            resolved += [Implementation(sp_impl_name(strategy, grid, kept), "sp", strategy, grid, block_impl, kept)
                         for grid in grids]
        elif isinstance(name, str) and name.startswith(SINGLE_DEVICE_PREFIX) \
                and name[len(SINGLE_DEVICE_PREFIX):] in ATTENTION_IMPLS:
            resolved.append(Implementation(name, "single_device", block_impl=name[len(SINGLE_DEVICE_PREFIX):]))
        elif name in (ALLGATHER_CUDNN, RINGATTENTION):
            resolved.append(Implementation(name, "anchor", grid=(1, devices)))
        else:
            raise BenchArgumentError("impls", f"unknown implementation {name!r}; expected {expected}")
    names = [impl.name for impl in resolved]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchArgumentError("impls", f"named more than once: {', '.join(duplicates)}")
    if not resolved:
        raise BenchArgumentError("impls", "expected at least one implementation")
    return tuple(resolved)


def _check_positive(argument: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BenchArgumentError(argument, f"expected a positive integer, got {value!r}")
    return value


def skip_reason(impl: Implementation, shape: AttentionShape, causal: bool, platform: str) -> str | None:
    """Why a row is not even tried, or None."""
    if impl.name == RINGATTENTION:
        if importlib.util.find_spec("ringattention") is None:
            return "the ringattention package is not installed (carry its wheel and einops')"
    elif impl.kind == "anchor":
        if causal:
            return "cuDNN takes no global causal offset (the anchors measure all-gather+cuDNN non-causal only)"
        if platform != "gpu":
            return f"needs a GPU (cuDNN); platform is {platform}"
    if impl.kind == "single_device" and impl.block_impl == "cudnn" and platform != "gpu":
        return f"needs a GPU (cuDNN); platform is {platform}"
    if impl.strategy == "ulysses" and shape.heads % (impl.grid[0] * impl.grid[1]):
        return f"ulysses needs heads ({shape.heads}) divisible by the {impl.grid[0] * impl.grid[1]} devices"
    if impl.strategy == "usp" and shape.heads % impl.grid[1]:
        return f"usp needs heads ({shape.heads}) divisible by its Ulysses degree Pkv = {impl.grid[1]}"
    return None


# ----------------------------------------------------------------------------------------------
# The functions under test


def make_mesh(grid: tuple[int, int]) -> Mesh:
    """Mesh(devices.reshape(1, Pq, Pkv), ("data", "seq_q", "seq_kv")) over all visible devices."""
    return Mesh(np.array(jax.devices()).reshape(1, *grid), MESH_AXES)


def sequence_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq, heads, head_dim] with seq split over (seq_q, seq_kv), row-major."""
    return NamedSharding(mesh, PartitionSpec(None, SEQ_AXES, None, None))


def attention_function(impl: Implementation, *, causal: bool, mesh: Mesh | None,
                       order: str | None = None) -> Callable[..., Array]:
    """(q, k, v) -> out [batch, seq_len, heads, head_dim] for one implementation, not jitted; `order`: of
    an sp_* row's sequence (random inputs: the order only says which positions the rows hold)."""
    if impl.kind == "sp":
        from longseq import parallel

        return lambda q, k, v: parallel.attention(q, k, v, mesh=mesh, strategy=impl.strategy, causal=causal,
                                                  impl=impl.block_impl, keep_gathered=impl.keep_gathered,
                                                  order=order or "natural")
    if impl.kind == "single_device":
        from longseq.ops import attention

        return lambda q, k, v: attention(q, k, v, causal=causal, impl=impl.block_impl)[0]

    tokens = PartitionSpec(None, SEQ_AXES, None, None)
    if impl.name == RINGATTENTION:
        return _ringattention_package(causal=causal, mesh=mesh, tokens=tokens)

    def allgather_cudnn(q, k, v):
        k = jax.lax.all_gather(k, SEQ_AXES, axis=1, tiled=True)
        v = jax.lax.all_gather(v, SEQ_AXES, axis=1, tiled=True)
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    return jax.shard_map(allgather_cudnn, mesh=mesh, in_specs=(tokens,) * 3, out_specs=tokens, check_vma=False)


def _ringattention_package(*, causal: bool, mesh: Mesh, tokens: PartitionSpec) -> Callable[..., Array]:
    """The `ringattention` package's ring_attention in shard_map, configured as sp2_anchor.py does.

    Only its pure-JAX module is loaded: the package's __init__ imports TPU-only code.
    """
    location = importlib.util.find_spec("ringattention").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("ringattention_jax", Path(location) / "ringattention_jax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def ring(q, k, v):  # the grid is 1×P: the ring runs over seq_kv
        chunk = min(1024, q.shape[1])  # 1024 as in the anchors; shorter local sequences (CPU tests) use theirs
        blockwise = dict(causal_block_size=1 if causal else None, query_chunk_size=chunk, key_chunk_size=chunk,
                         deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32,
                         policy=jax.checkpoint_policies.nothing_saveable, precision=None, prevent_cse=True)
        return module.ring_attention(q, k, v, None, None, None, "seq_kv", True, blockwise)

    return jax.shard_map(ring, mesh=mesh, in_specs=(tokens,) * 3, out_specs=tokens, check_vma=False)


# ----------------------------------------------------------------------------------------------
# Running


def _row(impl: Implementation, shape: AttentionShape, dtype: jnp.dtype, causal: bool, pass_: str) -> dict[str, Any]:
    return {"impl": impl.name, "strategy": impl.strategy, "keep_gathered": impl.keep_gathered,
            "grid": f"{impl.grid[0]}x{impl.grid[1]}" if impl.grid else None,
            "devices": impl.grid[0] * impl.grid[1] if impl.grid else 1, "block_impl": impl.block_impl,
            "B": shape.batch, "N": shape.seq_len, "H": shape.heads, "D": shape.head_dim, "dtype": dtype.name,
            "causal": causal, "pass": pass_, "flops": attention_flops(shape, causal=causal, pass_=pass_),
            "ms": None, "ms_min": None, "ms_max": None, "tflops": None,
            "scaling_efficiency": None, "ratio_to_allgather_cudnn": None, "ratio_to_ringattention": None,
            "error": None}


def _progress_line(index: int, total: int, row: dict[str, Any]) -> str:
    where = (f"[{index:>{len(str(total))}}/{total}] {row['impl']:<28} N={row['N']} H={row['H']} D={row['D']} "
             f"causal={'yes' if row['causal'] else 'no '} {row['pass']:<7}")
    if row["error"]:
        return f"{where} {row['error']}"
    return f"{where} {row['ms']:10.3f} ms {row['tflops']:9.3f} TFLOP/s"


def add_ratios(rows: Sequence[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Copies of the rows with scaling_efficiency (against `baseline`) and the ratios to the anchors."""
    def problem(row):
        return (row["B"], row["N"], row["H"], row["D"], row["dtype"], row["causal"], row["pass"])

    def tflops_of(impl):
        return {problem(row): row["tflops"] for row in rows if row["impl"] == impl and row["tflops"]}

    single = tflops_of(baseline)
    anchors = {"ratio_to_allgather_cudnn": tflops_of(ALLGATHER_CUDNN), "ratio_to_ringattention": tflops_of(RINGATTENTION)}
    out = []
    for row in rows:
        one = single.get(problem(row))
        measured = row["tflops"] is not None
        efficiency = row["tflops"] / (row["devices"] * one) if one and measured and row["impl"] != baseline else None
        ratios = {}
        for column, anchor_tflops in anchors.items():
            anchor = anchor_tflops.get(problem(row))
            ratios[column] = row["tflops"] / anchor if anchor and measured and not row["impl"].startswith("anchor_") else None
        out.append({**row, "scaling_efficiency": efficiency, **ratios})
    return out


def run_parallel_bench(seq_lens: Iterable[int] = SHAPE_PRESETS["default"].seq_lens,
                       impls: Sequence[str] | None = None, *, batch: int = 1, heads: int = 16, head_dim: int = 128,
                       dtype: Any = "bfloat16", causal: bool | Sequence[bool] = (False, True),
                       passes: Sequence[str] = ("fwd+bwd",), block_impl: str | None = None,
                       order: str = "model", iters: int = 5,
                       warmup: int = 2, out_dir: str | Path | None = None, seed: int = 0, verbose: bool = True,
                       command: str | None = None) -> list[dict[str, Any]]:
    """Measure every implementation on every sequence length, causal setting and pass; one dict per row.

    Args:
      seq_lens: sequence lengths N, each divisible by jax.device_count().
      impls: names as in the module docstring; None = default_impls (every strategy on its default
        grids, single_device_<block_impl>, and anchor_allgather_cudnn on GPU).
      batch, heads, head_dim: of q, k, v ([batch, N, heads, head_dim]).
      dtype: of q, k, v and dout (e.g. "bfloat16", "float32").
      causal: which causal settings (a bool or a sequence of bools).
      passes: a subset of ("fwd", "fwd+bwd").
      block_impl: the longseq.ops implementation of every block (and of the default single-device
        baseline); default "cudnn" on GPU, "reference" elsewhere.
      order: the sequence order of the sp_* rows' inputs: "model" = the order an LM keeps its tokens
        in (`DecoderLM`: zigzag for the strategies that balance in place, so a causal call swaps
        nothing; natural for the rest), "natural" = every strategy's causal call swaps into balance
        and back.
      iters, warmup: timed and untimed calls per row (see longseq.bench.timing.time_calls).
      out_dir: if given, parallel.json, parallel.md and parallel.png are written there.
      seed: of the random inputs.
      verbose: print one progress line per row as it finishes.
      command: recorded in the JSON metadata (default: this process's command line).

    Returns:
      The rows, in the order measured (schema in the module docstring).

    Raises:
      BenchArgumentError (a ValueError) naming the argument, before anything compiles.
    """
    from longseq.ops import ATTENTION_IMPLS

    devices = jax.device_count()
    platform = jax.devices()[0].platform
    if isinstance(seq_lens, int):
        seq_lens = (seq_lens,)
    seq_lens = tuple(seq_lens)
    if not seq_lens:
        raise BenchArgumentError("seq_lens", "expected at least one sequence length")
    for seq_len in seq_lens:
        _check_positive("seq_lens", seq_len)
        if seq_len % devices:
            raise BenchArgumentError("seq_lens", f"N={seq_len} is not divisible by the {devices} devices")
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        _check_positive(name, value)
    dtype = check_dtype(dtype)
    causal_settings = check_choices("causal", (causal,) if isinstance(causal, bool) else causal, (False, True))
    passes = check_choices("passes", passes, PASSES)
    for name, value, least in (("iters", iters, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise BenchArgumentError(name, f"expected an integer >= {least}, got {value!r}")
    order = check_choices("order", (order,), ("model", "natural"))[0]
    block_impl = default_block_impl(platform) if block_impl is None else block_impl
    if block_impl not in ATTENTION_IMPLS:
        raise BenchArgumentError("block_impl", f"expected one of {', '.join(ATTENTION_IMPLS)}, got {block_impl!r}")
    implementations = resolve_impls(default_impls(platform, block_impl) if impls is None else impls,
                                    devices=devices, block_impl=block_impl)
    baseline = SINGLE_DEVICE_PREFIX + block_impl

    total = len(seq_lens) * len(causal_settings) * len(implementations) * len(passes)
    finished = itertools.count(1)

    def report(row: dict[str, Any]) -> None:
        if verbose:
            print(_progress_line(next(finished), total, row), flush=True)

    rows: list[dict[str, Any]] = []
    for seq_len in seq_lens:
        shape = AttentionShape(batch, seq_len, heads, head_dim)
        inputs = make_inputs(shape, dtype, seed)  # on the default device: the single-device rows' inputs
        for impl in implementations:
            mesh = make_mesh(impl.grid) if impl.grid else None
            # Sharded copies per mesh, dropped after the impl: only one set lives beside the originals.
            args = inputs if mesh is None else tuple(jax.device_put(x, sequence_sharding(mesh)) for x in inputs)
            for is_causal in causal_settings:
                rows.extend(_measure(impl, shape, dtype, is_causal, passes, args, mesh, platform=platform,
                                     order=order, iters=iters, warmup=warmup, on_row=report))
            del args
            gc.collect()
        del inputs
        gc.collect()

    rows = add_ratios(rows, baseline)
    if out_dir is not None:
        meta = run_metadata(iters=iters, warmup=warmup, seed=seed,
                            command=command if command is not None else shlex.join(sys.argv))
        meta.update(block_impl=block_impl, efficiency_baseline=baseline, order=order,
                    devices=[str(device) for device in jax.devices()])
        write_outputs(rows, meta, out_dir)
    return rows


def _measure(impl: Implementation, shape: AttentionShape, dtype: jnp.dtype, causal: bool, passes: Sequence[str],
             inputs: tuple[Array, Array, Array, Array], mesh: Mesh | None, *, platform: str, order: str,
             iters: int, warmup: int, on_row: Callable[[dict], None]) -> list[dict[str, Any]]:
    """The rows of one implementation on one shape and causal setting, one per pass; failures recorded."""
    q, k, v, dout = inputs
    sequence_order = None
    if impl.kind == "sp":
        sequence_order = "zigzag" if order == "model" and impl.strategy in BALANCED_IN_PLACE else "natural"
    rows = [dict(_row(impl, shape, dtype, causal, pass_), order=sequence_order) for pass_ in passes]
    reason = skip_reason(impl, shape, causal, platform)
    forward = grads = None
    if reason is None:
        try:
            fn = attention_function(impl, causal=causal, mesh=mesh, order=sequence_order)
            forward, grads = jax.jit(fn), jax.jit(forward_and_backward(fn))
        except Exception as error:  # noqa: BLE001 - e.g. a strategy that rejects the mesh
            reason = short_reason(error)
    return time_rows(rows, {"fwd": (forward, (q, k, v)), "fwd+bwd": (grads, (q, k, v, dout))}, reason=reason,
                     iters=iters, warmup=warmup, on_row=on_row,
                     rate=lambda row, seconds: {"tflops": row["flops"] / seconds / 1e12})


# ----------------------------------------------------------------------------------------------
# Outputs: JSON, markdown, plot


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["error"]:
        return "OOM" if "out of memory" in row["error"] else "—"
    notes = []
    if row["scaling_efficiency"] is not None:
        notes.append(f"{row['scaling_efficiency']:.0%}")
    if row["ratio_to_allgather_cudnn"] is not None:
        notes.append(f"{row['ratio_to_allgather_cudnn']:.2f}× ag")
    if row.get("ratio_to_ringattention") is not None:
        notes.append(f"{row['ratio_to_ringattention']:.1f}× rp")
    text = _format_number(row["tflops"])
    return f"{text} ({', '.join(notes)})" if notes else text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per N/causal/pass, TFLOP/s per implementation with (efficiency, × all-gather+cuDNN).

    Below it, each distinct reason a row was skipped.
    """
    lines = attention_problem_lines(rows, _cell)
    legend = ("Whole-problem TFLOP/s (scaling efficiency = TFLOP/s / (devices × single-device TFLOP/s); "
              "× ag = ratio to anchor_allgather_cudnn, × rp = ratio to anchor_ringattention)")
    if any(row["error"] for row in rows):
        legend += "; — = skipped, reasons below"
    lines.insert(0, legend + ".\n")

    lines += skipped_lines(rows)
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """parallel.json ({"meta", "rows"}), parallel.md and parallel.png in out_dir (created)."""
    header = (f"# Sequence-parallel attention benchmark\n\n{meta['device_count']} × {meta['device_kind']} "
              f"({meta['platform']}), jax {meta['jax']}, {meta['date']}; blocks: {meta['block_impl']}; "
              f"median of {meta['iters']} timed calls after {meta['warmup']} warm-up calls.\n"
              f"FLOPs: {meta['flop_convention']}.\n\n`{meta['command']}`\n\n")
    return save_outputs("parallel", rows, meta, header + format_table(rows), plot, out_dir)
