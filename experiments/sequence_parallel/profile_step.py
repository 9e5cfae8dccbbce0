"""Where one sequence-parallel attention step spends its GPU time.

Runs one jitted forward+backward of `longseq.parallel.attention` (bf16, B=1) under `jax.profiler`,
then reads the trace back (jax.profiler.ProfileData) and sums, per GPU, the kernel time of each kind:
attention kernels (cuDNN / Pallas), NCCL collectives and everything else (XLA fusions: casts, merges,
copies), with how much of the NCCL time ran while an attention kernel ran on the same GPU.

    PYTHONPATH=src python3 experiments/sequence_parallel/profile_step.py \
        --strategy attention2d --grid 2x1 --seq 65536 --causal

`--strategy none` profiles one GPU's `ops.attention` on the whole problem instead (the baseline). Prints
one line per GPU with the ten longest "other" kernels, and the host threads' longest kinds of event
(where the host spends a step that the GPUs do not).
"""

from __future__ import annotations

import argparse
import collections
import glob
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longseq import parallel
from longseq.ops import attention


def kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if any(word in lowered for word in ("cudnn", "fmha", "flash", "attention", "sm90_", "mha")):
        return "attention"
    return "other"


def busy(intervals):
    """Merged [start, end) intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def overlap(a, b) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="attention2d", help="a longseq.parallel strategy, or none")
    parser.add_argument("--grid", default=None, help="PqxPkv (default 1xP)")
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()

    devices = jax.devices()
    rows, cols = map(int, args.grid.split("x")) if args.grid else (1, len(devices))
    if args.strategy == "none":
        rows = cols = 1
    mesh = Mesh(np.array(devices[:rows * cols]).reshape(1, rows, cols), ("data", "seq_q", "seq_kv"))
    sharding = NamedSharding(mesh, PartitionSpec(None, ("seq_q", "seq_kv"), None, None))
    shape = (1, args.seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.device_put(jax.random.normal(key, shape, jnp.bfloat16), sharding) for key in keys)

    def loss(q, k, v, dout):
        if args.strategy == "none":
            out = attention(q, k, v, causal=args.causal)[0]
        else:
            out = parallel.attention(q, k, v, mesh=mesh, strategy=args.strategy, causal=args.causal)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v, dout))
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(step(q, k, v, dout))
    wall_ms = (time.perf_counter() - start) / 3 * 1e3

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(step(q, k, v, dout))
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])

    print(f"{args.strategy} {rows}x{cols} N={args.seq} H={args.heads} D={args.head_dim} causal={args.causal} "
          f": {wall_ms:.2f} ms per step (untraced)")
    for plane in data.planes:
        if plane.name.startswith("/host:CPU"):
            host = collections.Counter()
            for line in plane.lines:
                if line.name != "python":
                    for event in line.events:
                        host[f"{line.name[:24]}: {event.name[:70]}"] += event.duration_ns
            print("  host, longest kinds of event:")
            for name, ns in host.most_common(12):
                print(f"      {ns / 1e6:7.3f} ms  {name}")
        if not plane.name.startswith("/device:GPU"):
            continue
        totals, intervals, others = collections.Counter(), collections.defaultdict(list), collections.Counter()
        first, last = float("inf"), 0.0
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                what = kind(event.name)
                end = event.start_ns + event.duration_ns
                totals[what] += event.duration_ns
                intervals[what].append((event.start_ns, end))
                first, last = min(first, event.start_ns), max(last, end)
                if what == "other":
                    others[event.name[:90]] += event.duration_ns
        if not totals:
            continue
        kernels, nccl = busy(intervals["attention"]), busy(intervals["nccl"])
        print(f"  {plane.name}: span {(last - first) / 1e6:.2f} ms | attention {totals['attention'] / 1e6:.2f} | "
              f"nccl {totals['nccl'] / 1e6:.2f} (under attention {overlap(kernels, nccl) / 1e6:.2f}) | "
              f"other {totals['other'] / 1e6:.2f}")
        for name, ns in others.most_common(10):
            print(f"      {ns / 1e6:7.3f} ms  {name}")


if __name__ == "__main__":
    main()
