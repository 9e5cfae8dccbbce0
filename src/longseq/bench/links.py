"""Link bandwidth between devices: the figures the sequence-parallel cost model needs.

    longseq bench links [--mib 1024] [--iters 5]

Each row times one jitted `ppermute` in which every device of a ring sends `mib` MiB to the next, and
reports GB/s one device sends one way (bytes / median time):

  intra   a ring over this process's devices (one node): `mesh.intra_node_gbps`;
  inter   with several processes, a ring in which every hop goes to the same local device of the next
          process (across nodes): `mesh.inter_node_gbps`.

The rate depends on the message: on 2× H200 (NVLink) 102, 138 and 289 GB/s for 64, 256 and 1024 MiB
(2026-11-29), against the anchors' 307 GB/s at 1 GiB. The default, 1 GiB, measures the streaming rate the
cost model's presets hold; its long transfers (all-gathers of whole K/V) run near it, its short ones slower.

A ring needs at least two devices; a pattern that cannot be formed is recorded as skipped with the
reason. Multi-process runs start `jax.distributed` from the environment first, as `longseq train`
does, and every process runs the same command.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longseq.bench.timing import time_calls


def rings() -> dict[str, list[jax.Device] | str]:
    """The device order of each pattern (a ring over the list), or why it cannot be formed."""
    local = jax.local_devices()
    out: dict[str, list[jax.Device] | str] = {}
    out["intra"] = local if len(local) > 1 else "needs 2 devices in this process"
    processes = jax.process_count()
    if processes < 2:
        out["inter"] = "needs several processes (hosts)"
    else:
        by_process = {p: sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                      for p in range(processes)}
        out["inter"] = [by_process[p][0] for p in range(processes)]  # device 0 of every process, in turn
    return out


def measure(devices: list[jax.Device], mib: float, iters: int, warmup: int) -> dict[str, Any]:
    """Median time of one ring shift of `mib` MiB per device over `devices`, and GB/s per device."""
    count = len(devices)
    mesh = Mesh(np.array(devices), ("ring",))
    elements = int(mib * 2**20) // 4
    sharding = NamedSharding(mesh, PartitionSpec("ring"))
    x = jax.device_put(jnp.zeros((count * elements,), jnp.float32), sharding)
    shift = jax.jit(jax.shard_map(lambda block: jax.lax.ppermute(block, "ring", [(i, (i + 1) % count)
                                                                                 for i in range(count)]),
                                  mesh=mesh, in_specs=PartitionSpec("ring"), out_specs=PartitionSpec("ring")))
    timing = time_calls(shift, x, iters=iters, warmup=warmup)
    nbytes = elements * 4
    return {"devices": count, "bytes_per_device": nbytes, "ms": timing.median_ms, "ms_min": timing.min_ms,
            "ms_max": timing.max_ms, "gbps": nbytes / (timing.median_ms * 1e-3) / 1e9}


def run_links_bench(mib: float = 1024, iters: int = 5, warmup: int = 2) -> list[dict[str, Any]]:
    """One row per pattern ("intra", "inter"): measured, or `error = "skipped: <reason>"`."""
    if not mib > 0:
        raise ValueError(f"mib: expected a positive size, got {mib!r}")
    rows = []
    for pattern, devices in rings().items():
        row = {"pattern": pattern, "platform": jax.devices()[0].platform,
               "device_kind": jax.devices()[0].device_kind, "error": None}
        if isinstance(devices, str):
            row["error"] = f"skipped: {devices}"
        else:
            row.update(measure(devices, mib, iters, warmup))
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| pattern | devices | MiB per device | median ms | GB/s per device, one way | config key |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        key = "mesh.intra_node_gbps" if row["pattern"] == "intra" else "mesh.inter_node_gbps"
        if row["error"]:
            lines.append(f"| {row['pattern']} | — | — | — | {row['error']} | {key} |")
        else:
            lines.append(f"| {row['pattern']} | {row['devices']} | {row['bytes_per_device'] / 2**20:g} | "
                         f"{row['ms']:.3f} | {row['gbps']:.1f} | {key}={row['gbps']:.0f} |")
    return "\n".join(lines)
