"""Communication benchmark: bytes each device sends in the collectives of sequence-parallel attention.

Nothing runs: every strategy of `longseq.parallel.attention` is jit-compiled for P simulated CPU
devices and the collectives are read from the compiled HLO. P devices need
XLA_FLAGS=--xla_force_host_platform_device_count=P before jax starts, so each P is one subprocess
(`python -m longseq.bench.comm --worker SPEC OUT`). In it, on
Mesh(devices.reshape(1, Pq, Pkv), ("data", "seq_q", "seq_kv")) and ShapeDtypeStruct inputs sharded
over (seq_q, seq_kv):

    fwd:       jit(attention(q, k, v, impl="reference")).lower(q, k, v).compile().as_text()
    fwd+bwd:   jit((q, k, v, dout) -> (out, grad of sum(out · dout) in float32 wrt (q, k, v))), the
               same way. out is returned as in a training step, where it feeds the next layer:
               without it XLA drops the forward's last collective as dead code (the gradient of
               sum(out · dout) does not need out).

Grids: attention2d, usp and double_ring on every Pq × Pkv = P (1×P … P×1), the other strategies on 1×P.
ulysses (and usp, whose Ulysses degree Pkv divides P) needs heads divisible by P: where they are not, its
rows use heads (and kv_heads) × the smallest factor that makes them so, and `ratio_to_ring` compares bytes
per head (every term of the model is linear in heads).

Bytes sent per device by one execution of each collective (g = its replica group's size; the
conventions of ring algorithms, as in NCCL's bus bandwidth):

    all-gather          (g − 1)/g × output bytes
    reduce-scatter      (g − 1)/g × input bytes  = (g − 1) × output bytes
    all-reduce          2·(g − 1)/g × bytes      (ring all-reduce: a reduce-scatter, then an all-gather)
    all-to-all          (g − 1)/g × bytes        (tuple operands summed)
    collective-permute  operand bytes × the number of pairs whose source is the busiest device

Async pairs (`*-start` / `*-done`) count once, at the start; collectives wrapped in `async-start`
count once, inside the wrapped computation; collectives over groups of one device move nothing and
are left out. A collective in a while body counts trip-count times when the HLO knows the trip
count (`known_trip_count`), else once, and the row's `unknown_trip_counts` says how many such
collectives there were. (longseq's ring is a Python loop, unrolled: no while loops.)

Two artefacts of XLA:CPU are undone so the bytes are those of the program's dtypes, as on GPU/TPU:
the worker disables the `float-normalization-bf16` pass (it widens bf16 all-gathers, permutes and
all-to-alls to f32 on CPU), and reductions that XLA:CPU promotes from 16-bit to f32 (its
`all-reduce-promotion` pass, recognised by a reducer named `*_promoted`; the CPU cannot reduce bf16)
count at 16 bits. `bytes_compiled` keeps the literal count.

Analytic model (`analytic_bytes`): `longseq.parallel.cost.bytes_sent`, the communication term of the
cost model behind `strategy: auto` (its `transfers` list every collective of every strategy, with the
formulas). In short, per device, with n = N/P, d = heads·head_dim, s = the itemsize: ring ≈ 2·N·d_kv·s
forward; attention2d on a √P × √P grid ≈ 2·(√P−1)/P·N·(d + d_kv)·s, so for d_kv = d the ratio 2D/ring is
2/(√P+1) forward, below 2/√P; usp moves Ulysses' all-to-all bytes over seq_kv and ring bytes over seq_q;
double_ring moves ring's bytes (P − 1 K/V hops), most of them inside a node. Bytes scale linearly in N:
the defaults (N = 8192) stand for any N. The measured bytes are the truth; the model is a guide. ring,
double_ring and attention2d have custom_vjps whose backward moves K/V (or gathers the blocks) again,
behind an optimization barrier so that XLA does not merge them with the forward's (which would keep
every step's K/V alive); XLA:CPU lowers the barrier away before merging, so there the measured fwd+bwd
rows of those strategies (and usp's ring) fall below the model (forward rows match it).

A row (a dict; JSON in comm.json under "rows", beside "meta"):

    strategy, grid          str              "attention2d", …; "PqxPkv"
    P, Pq, Pkv              int              devices, the grid
    B, N, H, H_kv, D        int              batch, seq_len, heads, kv_heads, head_dim (ulysses: scaled)
    dtype                   str              of q, k, v and dout
    pass                    str              "fwd" or "fwd+bwd"
    bytes                   float | None     measured bytes sent per device (program dtypes, see above)
    bytes_compiled          float | None     the same, literally as XLA:CPU compiled it
    bytes_by_kind           dict             {"all-gather": bytes, …} of `bytes`
    ops_by_kind             dict             {"all-gather": executions per call, …}
    unknown_trip_counts     int              collectives in while loops of unknown trip count
    analytic_bytes          float            analytic_bytes(...) of the row
    measured_over_analytic  float | None     bytes / analytic_bytes
    ratio_to_ring           float | None     bytes per head / ring's bytes per head, same P and pass
    error                   str | None       "skipped: <reason>" or None
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform as python_platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from longseq.bench.outputs import json_safe, save_outputs
from longseq.bench.timing import short_reason
from longseq.bench.attention import (
    PASSES,
    BenchArgumentError,
    _format_number,
    check_choices,
    check_dtype,
)
from longseq.parallel import STRATEGIES, cost

DEFAULT_DEVICES = (4, 8, 16, 64)
# XLA:CPU widens bf16 collectives to f32 in this pass; GPUs and TPUs move bf16 as it is. Nothing
# runs, so LLVM need not optimise the code (halves compile time; the HLO passes are the same).
CPU_XLA_FLAGS = "--xla_disable_hlo_passes=float-normalization-bf16 --xla_backend_optimization_level=0"
MESH_AXES = ("data", "seq_q", "seq_kv")

# ----------------------------------------------------------------------------------------------
# Reading collectives from compiled HLO text

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s"
                          r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of an HLO module and the bytes each device sends per execution."""

    kind: str            # one of COLLECTIVE_KINDS
    name: str
    computation: str
    group_size: int
    bytes_sent: float    # per device, one execution, as compiled
    promoted: bool       # a 16-bit reduction XLA widened to f32: the program's dtype moves half
    executions: int = 1  # per call of the module (while trip counts)
    trip_count_known: bool = True


def _array_bytes(shape_text: str) -> float:
    """Bytes of every array in a (possibly tuple) HLO shape, e.g. "(bf16[2,4]{1,0}, f32[8])"."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue  # token[] and the like carry no data
        total += size * math.prod(int(dim) for dim in dims.split(",") if dim)
    return total


def _tuple_elements(shape_text: str) -> list[str]:
    """The top-level elements of a tuple shape; [shape_text] for an array shape."""
    text = re.sub(r"/\*.*?\*/", "", shape_text).strip()
    if not text.startswith("("):
        return [text]
    elements, depth, start = [], 0, 1
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 1:
            elements.append(text[start:index].strip())
            start = index + 1
    elements.append(text[start:text.rindex(")")].strip())
    return [element for element in elements if element]


def _group_size(attributes: str, num_devices: int) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{((?:\{[\d,\s]*\}\s*,?\s*)*)\}", attributes)
    groups = re.findall(r"\{([\d,\s]*)\}", listed.group(1)) if listed else []
    sizes = [len([item for item in group.split(",") if item.strip()]) for group in groups]
    return max(sizes) if sizes else num_devices  # {} means every device in one group


def _busiest_source(attributes: str) -> int:
    """How many of a collective-permute's pairs the busiest device sends (pairs to itself move nothing)."""
    listed = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    pairs = re.findall(r"\{(\d+),(\d+)\}", listed.group(0)) if listed else []
    counts: dict[str, int] = {}
    for source, target in pairs:
        if source != target:
            counts[source] = counts.get(source, 0) + 1
    return max(counts.values(), default=0)


def _bytes_sent(op: str, shape: str, attributes: str, group: int) -> float:
    """Bytes one device sends in one execution of a collective (conventions in the module docstring)."""
    kind = op.removesuffix("-start")
    elements = _tuple_elements(shape)
    if kind == "all-gather":
        # all-gather-start's shape is (operands, outputs); the plain op's is the output.
        output = elements[len(elements) // 2:] if op.endswith("-start") and len(elements) > 1 else elements
        return (group - 1) / group * sum(map(_array_bytes, output))
    if kind == "reduce-scatter":
        return (group - 1) * _array_bytes(shape)
    if kind == "all-reduce":
        return 2 * (group - 1) / group * _array_bytes(shape)
    if kind == "all-to-all":
        return (group - 1) / group * _array_bytes(shape)
    # collective-permute-start's shape is (operand, output, contexts...): the operand is sent.
    sent = _array_bytes(elements[0]) if op.endswith("-start") else _array_bytes(shape)
    return sent * _busiest_source(attributes)


def parse_collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
    """Every collective of a compiled HLO module, with bytes sent per device and executions per call.

    Args:
      hlo_text: `compiled.as_text()` (or any HLO module text).
      num_devices: the group size of collectives with empty replica_groups; default the module's
        num_partitions (1 if absent).
    """
    if num_devices is None:
        found = re.search(r"num_partitions=(\d+)", hlo_text)
        num_devices = int(found.group(1)) if found else 1
    computation, entry = None, None
    callers: dict[str, list[tuple[str, int, bool]]] = {}  # callee -> [(caller, factor, known)]
    found_collectives: list[Collective] = []
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and " = " not in line.split("(")[0]:
            computation = header["name"]
            entry = computation if header["entry"] else entry
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        op, rest = instruction["op"], instruction["rest"]
        if op not in ("async-update", "async-done"):  # they name the computation async-start runs
            trip = _TRIP_COUNT.search(rest) if op == "while" else None
            for key, value in _CALLEES.findall(rest):
                factor = int(trip.group(1)) if key == "body" and trip else 1
                known = not (op == "while" and key == "body" and trip is None)
                for callee in re.findall(r"%?([\w.\-]+)", value):
                    callers.setdefault(callee, []).append((computation, factor, known))
        if op.removesuffix("-start") in COLLECTIVE_KINDS:
            group = _group_size(rest, num_devices)
            reducer = re.search(r"to_apply=%?([\w.\-]+)", rest)
            found_collectives.append(Collective(
                kind=op.removesuffix("-start"), name=instruction["name"], computation=computation,
                group_size=group, bytes_sent=_bytes_sent(op, instruction["shape"], rest, group),
                promoted=bool(reducer and re.search(r"_promoted(\.\d+)?$", reducer.group(1)))))

    def executions(name: str, seen: frozenset = frozenset()) -> tuple[int, bool]:
        if name == entry or name not in callers or name in seen or entry is None:
            return 1, True
        total, known = 0, True
        for caller, factor, caller_known in callers[name]:
            count, count_known = executions(caller, seen | {name})
            total += count * factor
            known = known and caller_known and count_known
        return total, known

    resolved = []
    for collective in found_collectives:
        count, known = executions(collective.computation)
        resolved.append(dataclasses.replace(collective, executions=count, trip_count_known=known))
    return resolved


def traffic(collectives: Iterable[Collective]) -> dict[str, Any]:
    """Bytes per device per call: total, as compiled, and by kind (program dtypes); executions by kind."""
    by_kind: dict[str, float] = {}
    ops_by_kind: dict[str, int] = {}
    compiled = 0.0
    unknown_loops = 0
    for collective in collectives:
        if collective.group_size < 2:
            continue  # over one device (e.g. the size-1 axis of a P×1 grid): moves nothing
        sent = collective.bytes_sent * collective.executions
        compiled += sent
        by_kind[collective.kind] = by_kind.get(collective.kind, 0.0) + (sent / 2 if collective.promoted else sent)
        ops_by_kind[collective.kind] = ops_by_kind.get(collective.kind, 0) + collective.executions
        unknown_loops += not collective.trip_count_known
    return {"bytes": sum(by_kind.values()), "bytes_compiled": compiled, "bytes_by_kind": by_kind,
            "ops_by_kind": ops_by_kind, "unknown_trip_counts": unknown_loops}


# ----------------------------------------------------------------------------------------------
# The analytic model


def analytic_bytes(strategy: str, P: int, Pq: int, Pkv: int, N: int, heads: int, kv_heads: int, head_dim: int,
                   itemsize: float, pass_: str, batch: int = 1) -> float:
    """Bytes each device sends per non-causal call by the cost model (`longseq.parallel.cost`), P = Pq · Pkv."""
    if Pq * Pkv != P:
        raise ValueError(f"grid: Pq × Pkv = {Pq} × {Pkv} is not P = {P}")
    problem = cost.Problem(batch, N, heads, kv_heads, head_dim, itemsize, causal=False)
    return cost.bytes_sent(strategy, (Pq, Pkv), problem, pass_)


# ----------------------------------------------------------------------------------------------
# Which configurations


grids = cost.grids  # every Pq × Pkv = P for attention2d, usp and double_ring (1×P first), 1×P for the others


def heads_for(strategy: str, devices: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(heads, kv_heads) of a row: ulysses (usp) scales both by the least factor making heads divisible
    by P (by the grid's Pkv: every grid of usp uses the least common multiple over them, here P)."""
    if strategy not in ("ulysses", "usp") or heads % devices == 0:
        return heads, kv_heads
    scale = math.lcm(heads, devices) // heads
    return heads * scale, kv_heads * scale


# ----------------------------------------------------------------------------------------------
# The worker: one process per device count (the flag must be set before jax starts)


def forward_and_backward(fn):
    """(q, k, v, dout) -> (out, (dq, dk, dv)): the output and the gradient of sum(out · dout) in float32."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, dout):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out

    def step(q, k, v, dout):
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, dout)
        return out, grads

    return step


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Compile every configuration of `spec` on jax.devices() (P of them) and read its collectives."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from longseq import parallel

    devices = spec["devices"]
    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} devices, jax sees {jax.device_count()} ({jax.devices()[0]})")
    dtype = jnp.dtype(spec["dtype"])
    rows = []
    for strategy in spec["strategies"]:
        heads, kv_heads = heads_for(strategy, devices, spec["heads"], spec["kv_heads"])
        for rows_q, cols_kv in grids(strategy, devices):
            mesh = Mesh(np.array(jax.devices()).reshape(1, rows_q, cols_kv), MESH_AXES)
            sharding = NamedSharding(mesh, PartitionSpec(None, ("seq_q", "seq_kv"), None, None))
            q = jax.ShapeDtypeStruct((spec["batch"], spec["seq_len"], heads, spec["head_dim"]), dtype,
                                     sharding=sharding)
            kv = jax.ShapeDtypeStruct((spec["batch"], spec["seq_len"], kv_heads, spec["head_dim"]), dtype,
                                      sharding=sharding)

            def fn(q, k, v, mesh=mesh, strategy=strategy):
                return parallel.attention(q, k, v, mesh=mesh, strategy=strategy, impl="reference")

            for pass_ in spec["passes"]:
                row = {"strategy": strategy, "grid": f"{rows_q}x{cols_kv}", "P": devices, "Pq": rows_q,
                       "Pkv": cols_kv, "B": spec["batch"], "N": spec["seq_len"], "H": heads, "H_kv": kv_heads,
                       "D": spec["head_dim"], "dtype": dtype.name, "pass": pass_, "error": None}
                try:
                    if pass_ == "fwd":
                        compiled = jax.jit(fn).lower(q, kv, kv).compile()
                    else:
                        compiled = jax.jit(forward_and_backward(fn)).lower(q, kv, kv, q).compile()
                    row.update(traffic(parse_collectives(compiled.as_text(), devices)))
                except Exception as error:  # noqa: BLE001 - one configuration must not lose the run
                    row["error"] = f"skipped: {short_reason(error)}"
                result = row["error"] or f"{_format_megabytes(row['bytes'])} MiB/device"
                print(f"P={devices:<3} {strategy}[{row['grid']}] {pass_:<7} {result}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def _xla_flags(devices: int) -> str:
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if not flag.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}", CPU_XLA_FLAGS])


def _compile_in_subprocess(spec: dict[str, Any], verbose: bool) -> list[dict[str, Any]]:
    env = {**os.environ, "XLA_FLAGS": _xla_flags(spec["devices"]), "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        spec_path, out_path = Path(folder) / "spec.json", Path(folder) / "rows.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "longseq.bench.comm", "--worker", str(spec_path), str(out_path)],
                              env=env, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, text=True)
        if done.returncode != 0 or not out_path.exists():
            tail = (done.stderr or "")[-2000:]
            raise RuntimeError(f"the worker for P={spec['devices']} failed (exit {done.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------------------------
# Running


def _check_positive(argument: str, value: Any, least: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise BenchArgumentError(argument, f"expected an integer >= {least}, got {value!r}")
    return value


def add_model_and_ratios(rows: Sequence[dict[str, Any]], itemsize: float) -> list[dict[str, Any]]:
    """Copies of the rows with analytic_bytes, measured_over_analytic and ratio_to_ring."""
    ring = {(row["P"], row["pass"]): row["bytes"] / row["H"] for row in rows
            if row["strategy"] == "ring" and row.get("bytes")}
    out = []
    for row in rows:
        model = analytic_bytes(row["strategy"], row["P"], row["Pq"], row["Pkv"], row["N"], row["H"], row["H_kv"],
                               row["D"], itemsize, row["pass"], row["B"])
        measured = row.get("bytes")
        reference = ring.get((row["P"], row["pass"]))
        out.append({**row, "analytic_bytes": model,
                    "measured_over_analytic": measured / model if measured is not None and model else None,
                    "ratio_to_ring": measured / row["H"] / reference if measured is not None and reference else None})
    return out


def run_comm_bench(devices: Sequence[int] = DEFAULT_DEVICES, *, seq_len: int = 8192, heads: int = 8,
                   kv_heads: int | None = None, head_dim: int = 64, batch: int = 1, dtype: Any = "bfloat16",
                   passes: Sequence[str] = PASSES, strategies: Sequence[str] = STRATEGIES,
                   out_dir: str | Path | None = None, jobs: int | None = None, verbose: bool = True,
                   command: str | None = None) -> list[dict[str, Any]]:
    """Compile every strategy and grid for each device count; one dict per row (schema in the docstring).

    Args:
      devices: device counts P (each ≥ 2; simulated CPU devices, one subprocess each).
      seq_len: N, divisible by every P. Bytes are linear in N.
      heads, kv_heads, head_dim: of q ([batch, N, heads, head_dim]) and k, v ([batch, N, kv_heads,
        head_dim]); kv_heads defaults to heads and must divide it.
      batch: of q, k, v.
      dtype: of q, k, v and dout (e.g. "bfloat16").
      passes: a subset of ("fwd", "fwd+bwd").
      strategies: a subset of STRATEGIES.
      out_dir: if given, comm.json, comm.md and comm.png are written there.
      jobs: worker subprocesses at a time (default: one per device count, at most os.cpu_count()).
      verbose: print one line per compiled configuration (from the workers).
      command: recorded in the JSON metadata (default: this process's command line).

    Raises:
      BenchArgumentError (a ValueError) naming the argument, before anything compiles.
    """
    if isinstance(devices, int):
        devices = (devices,)
    devices = tuple(devices)
    if not devices:
        raise BenchArgumentError("devices", "expected at least one device count")
    for count in devices:
        _check_positive("devices", count, least=2)
    for name, value in (("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim), ("batch", batch)):
        _check_positive(name, value)
    kv_heads = heads if kv_heads is None else _check_positive("kv_heads", kv_heads)
    if heads % kv_heads:
        raise BenchArgumentError("kv_heads", f"expected a divisor of heads={heads}, got {kv_heads}")
    for count in devices:
        if seq_len % count:
            raise BenchArgumentError("seq_len", f"N={seq_len} is not divisible by P={count} devices")
    dtype = check_dtype(dtype)
    passes = check_choices("passes", passes, PASSES)
    strategies = check_choices("strategies", strategies, STRATEGIES)

    jobs = min(len(devices), os.cpu_count() or 1) if jobs is None else _check_positive("jobs", jobs)

    specs = [{"devices": count, "seq_len": seq_len, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "batch": batch, "dtype": dtype.name, "passes": list(passes), "strategies": list(strategies)}
             for count in devices]
    # Compiling is mostly one thread: the workers run side by side (their progress lines interleave).
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = [row for rows_of_p in pool.map(lambda spec: _compile_in_subprocess(spec, verbose), specs)
                for row in rows_of_p]
    rows = add_model_and_ratios(rows, dtype.itemsize)
    if out_dir is not None:
        write_outputs(rows, _metadata(command if command is not None else shlex.join(sys.argv), devices), out_dir)
    return rows


def _metadata(command: str, devices: Sequence[int]) -> dict[str, Any]:
    import jax

    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        jaxlib_version = None
    return {"jax": jax.__version__, "jaxlib": jaxlib_version, "python": python_platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
            "devices": list(devices), "platform": "cpu (simulated devices, compiled only)",
            "xla_flags": CPU_XLA_FLAGS, "block_impl": "reference",
            "bytes_convention": "sent per device per call; all-gather (g-1)/g*out, reduce-scatter (g-1)/g*in, "
                                "all-reduce 2(g-1)/g (ring), all-to-all (g-1)/g, collective-permute operand "
                                "(busiest source); 16-bit reductions XLA:CPU promoted to f32 counted at 16 bits"}


# ----------------------------------------------------------------------------------------------
# Outputs: JSON, markdown, plot


def _format_megabytes(value: float | None) -> str:
    return "—" if value is None else _format_number(value / 2**20)


def best_grid(rows: Sequence[dict[str, Any]], strategy: str, P: int, pass_: str) -> dict[str, Any] | None:
    """The strategy's row with the fewest measured bytes at P, pass (its best grid)."""
    candidates = [row for row in rows if row["strategy"] == strategy and row["P"] == P
                  and row["pass"] == pass_ and row.get("bytes") is not None]
    return min(candidates, key=lambda row: row["bytes"], default=None)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per strategy/grid/P/pass with measured and analytic MiB per device, then
    per P and pass the measured attention2d(best grid)/ring ratio beside 2/√P."""
    kinds = [kind for kind in COLLECTIVE_KINDS if any(kind in row.get("bytes_by_kind", {}) for row in rows)]
    header = ["P", "pass", "strategy", "grid", "H", "measured MiB", "model MiB", "meas/model", "× ring",
              *(f"{kind} MiB" for kind in kinds)]
    lines = ["Bytes sent per device per call (MiB = 2²⁰ bytes), read from the compiled HLO; model = "
             "analytic_bytes; × ring = per-head bytes / ring's at the same P and pass.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ratio = row.get("measured_over_analytic")
        to_ring = row.get("ratio_to_ring")
        by_kind = row.get("bytes_by_kind", {})
        values = [str(row["P"]), row["pass"], row["strategy"], row["grid"], str(row["H"]),
                  row["error"] or _format_megabytes(row.get("bytes")), _format_megabytes(row["analytic_bytes"]),
                  "—" if ratio is None else f"{ratio:.2f}", "—" if to_ring is None else f"{to_ring:.3g}",
                  *(_format_megabytes(by_kind[kind]) if kind in by_kind else "" for kind in kinds)]
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", "attention2d (best grid) / ring, measured, against 2/√P:", ""]
    for P in dict.fromkeys(row["P"] for row in rows):
        for pass_ in dict.fromkeys(row["pass"] for row in rows):
            best = best_grid(rows, "attention2d", P, pass_)
            if best is not None and best.get("ratio_to_ring") is not None:
                lines.append(f"- P={P} {pass_}: {best['grid']} sends {best['ratio_to_ring']:.3f} × ring "
                             f"(2/√P = {2 / math.sqrt(P):.3f})")
    unknown = sum(row.get("unknown_trip_counts", 0) for row in rows)
    if unknown:
        lines.append(f"\n{unknown} collective(s) sit in while loops of unknown trip count: counted once.")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Log-log bytes/device against P, one line per strategy (the two-axis ones: their best grid),
    measured solid, model dashed; one panel per pass. ulysses and usp rows are scaled to the requested
    heads."""
    from matplotlib.figure import Figure

    passes = list(dict.fromkeys(row["pass"] for row in rows))
    heads = min((row["H"] for row in rows), default=1)  # the requested heads: only ulysses scales up
    figure = Figure(figsize=(6 * len(passes), 4.4))
    axes = figure.subplots(1, len(passes), squeeze=False).ravel()
    # ring and allgather_kv send the same bytes: the wide, pale ring line shows under allgather_kv's.
    styles = {"attention2d": dict(color="C0", marker="o"), "ring": dict(color="C1", marker="s", linewidth=5, alpha=0.5),
              "ulysses": dict(color="C2", marker="^"), "allgather_kv": dict(color="C3", marker="D", markersize=3),
              "usp": dict(color="C4", marker="v"), "double_ring": dict(color="C5", marker="x")}
    for axis, pass_ in zip(axes, passes):
        for strategy in STRATEGIES:
            points = []
            for P in sorted({row["P"] for row in rows}):
                if strategy in cost.TWO_AXIS:
                    row = best_grid(rows, strategy, P, pass_)
                else:
                    row = next((row for row in rows if row["strategy"] == strategy and row["P"] == P
                                and row["pass"] == pass_ and row.get("bytes") is not None), None)
                if row is not None:
                    scale = heads / row["H"]
                    points.append((P, row["bytes"] * scale, row["analytic_bytes"] * scale))
            if not points:
                continue
            label = {"attention2d": "attention2d (best grid)", "ulysses": f"ulysses (per {heads} heads)",
                     "usp": f"usp (best grid, per {heads} heads)", "double_ring": "double_ring (best grid)"}
            Ps, measured, model = zip(*points)
            axis.plot(Ps, measured, "-", label=label.get(strategy, strategy), **{"markersize": 4, **styles[strategy]})
            axis.plot(Ps, model, "--", color=styles[strategy]["color"], linewidth=1)
            if strategy == "ring":
                axis.plot(Ps, [bytes_ * 2 / math.sqrt(P) for P, bytes_ in zip(Ps, measured)], ":", color="gray",
                          label="ring × 2/√P")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set(xlabel="devices P", ylabel="bytes sent per device", title=f"{pass_} (dashed: model)")
        axis.grid(alpha=0.3, which="both")
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def write_outputs(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """comm.json ({"meta", "rows"}), comm.md and comm.png in out_dir (created)."""
    first = rows[0] if rows else {}
    header = (f"# Collective bytes of sequence-parallel attention\n\nCompiled (never run) on simulated CPU "
              f"devices, jax {meta['jax']}, {meta['date']}; B={first.get('B')}, N={first.get('N')}, "
              f"H={first.get('H')}, H_kv={first.get('H_kv')}, D={first.get('D')}, {first.get('dtype')} "
              "(bytes are linear in N and in heads).\n\n"
              f"`{meta['command']}`\n\n")
    return save_outputs("comm", rows, meta, header + format_table(rows), plot, out_dir)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="worker of longseq bench comm (one device count)")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.worker[0]).read_text())
    Path(args.worker[1]).write_text(json.dumps(json_safe(_worker(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
