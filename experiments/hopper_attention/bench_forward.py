"""On a Hopper GPU: the flash-attention forward prototype (flash_forward.py) checked against XLA's attention and
timed beside cuDNN and longseq's portable Pallas kernel, in one process.

    PYTHONPATH=src python3 experiments/hopper_attention/bench_forward.py [--out rows.json]

The anchors' shapes (../shared/anchors/README.md): bf16, head_dim 128, [batch, seq, heads, head_dim], forward
only; TFLOP/s = 4·B·H·N²·D (half when causal) over the median time (calls grouped: longseq.bench.timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from longseq.bench.timing import time_calls
from longseq.ops import attention

sys.path.insert(0, os.path.dirname(__file__))
import flash_forward  # noqa: E402

SHAPES = ((4, 4096, 16), (1, 16384, 16), (1, 32768, 16), (1, 65536, 8))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--block-kv", default="128,64", help="the prototype's block_kv values to time")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    rows = []
    for batch, seq, heads in SHAPES:
        for causal in (False, True):
            keys = jax.random.split(jax.random.key(seq), 3)
            q, k, v = (jax.random.normal(key, (batch, seq, heads, 128), jnp.float32).astype(jnp.bfloat16)
                       for key in keys)
            flops = 4 * batch * heads * seq * seq * 128 / (2 if causal else 1)
            calls = {
                "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                      implementation="cudnn"),
                "pallas": lambda q, k, v: attention(q, k, v, causal=causal, impl="pallas")[0],
            }
            for block_kv in map(int, args.block_kv.split(",")):
                calls[f"mosaic_kv{block_kv}"] = lambda q, k, v, b=block_kv: flash_forward.flash_forward(
                    q, k, v, causal=causal, block_kv=b)[0]
            row = {"B": batch, "N": seq, "H": heads, "causal": causal, "ms": {}, "tflops": {}, "err": {}}
            want = calls["cudnn"](q, k, v).astype(jnp.float32)
            for name, call in calls.items():
                try:
                    f = jax.jit(call)
                    got = f(q, k, v).astype(jnp.float32)
                    row["err"][name] = float(jnp.abs(got - want).max())
                    ms = time_calls(f, q, k, v, iters=10).median_ms
                    row["ms"][name], row["tflops"][name] = ms, flops / ms / 1e9
                except Exception as e:  # noqa: BLE001
                    row["err"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = list(rows[0]["err"])
    print("\n| B | N | H | causal | " + " | ".join(names) + " | best mosaic / cudnn |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for row in rows:
        t = row["tflops"]
        best = max((v for name, v in t.items() if name.startswith("mosaic")), default=float("nan"))
        cells = " | ".join(f"{t[name]:.0f}" if name in t else "err" for name in names)
        print(f"| {row['B']} | {row['N']} | {row['H']} | {row['causal']} | {cells} | "
              f"{best / t.get('cudnn', float('nan')):.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
