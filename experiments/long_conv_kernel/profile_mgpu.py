"""In-kernel timeline of the Mosaic GPU prototype (Mosaic GPU's own profiler: named scopes, per warpgroup).

    PYTHONPATH=src python3 experiments/long_conv_kernel/profile_mgpu.py OUT_DIR

Prints, per shape, each scope's mean time per occurrence and its share of the warpgroup's span.
"""
import collections
import functools
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import monarch_mgpu  # noqa: E402

out = sys.argv[1]
print(jax.devices()[0].device_kind, jax.__version__, flush=True)
for n, wgs in ((4096, 1), (1024, 2), (1024, 1)):
    b, h = 8, 768
    u = jax.random.normal(jax.random.key(0), (b * h, n), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (h, n), jnp.float32) / np.sqrt(n)
    khat, consts = monarch_mgpu.kernel_spectrum(k, n), monarch_mgpu.constants(n)
    folder = os.path.join(out, f"prof_{n}_w{wgs}")
    os.makedirs(folder, exist_ok=True)
    try:
        f = jax.jit(functools.partial(monarch_mgpu.long_conv_rows, consts=consts, channels=h, ctas=132, wgs=wgs,
                                      profile_dir=folder))
        jax.block_until_ready(f(u, khat))
        jax.effects_barrier()
    except Exception as e:  # noqa: BLE001
        print(n, wgs, "FAILED", type(e).__name__, str(e)[:300], flush=True)
        continue
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        print(n, wgs, "no trace written", flush=True)
        continue
    events = json.load(open(files[-1]))["traceEvents"]
    open_at, totals, counts = {}, collections.Counter(), collections.Counter()
    spans = collections.defaultdict(lambda: [np.inf, -np.inf])
    for e in events:
        key = (e["tid"], e["name"])
        span = spans[e["tid"]]
        span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"])
        if e["ph"] == "B":
            open_at[key] = e["ts"]
        else:
            totals[e["name"]] += e["ts"] - open_at.pop(key)
            counts[e["name"]] += 1
    span_us = sum(s[1] - s[0] for s in spans.values())
    print(f"\nn={n} wgs={wgs}: {len(spans)} warpgroup traces, mean span {span_us / len(spans):.1f} us")
    print("| scope | occurrences | mean us | share of span |")
    print("|---|---|---|---|")
    for name in totals:
        print(f"| {name} | {counts[name]} | {totals[name] / counts[name]:.3f} | {totals[name] / span_us:.1%} |")
    sys.stdout.flush()
