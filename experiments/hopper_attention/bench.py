"""On a Hopper GPU: the flash-attention prototype (flash_forward.py, flash_backward.py) checked against cuDNN and
timed beside it and longseq's portable Pallas kernel, forward and forward + backward, in one process.

    PYTHONPATH=src python3 experiments/hopper_attention/bench.py [--out rows.json]

The anchors' shapes (../shared/anchors/README.md): bf16, head_dim 128, [batch, seq, heads, head_dim];
TFLOP/s = 4·B·H·N²·D (half when causal), × 3.5 for forward + backward, over the median time (calls grouped:
longseq.bench.timing). Errors: the largest absolute difference from cuDNN (of out, or of dq, dk, dv).
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
import flash_backward  # noqa: E402
import flash_forward  # noqa: E402

SHAPES = ((4, 4096, 16), (1, 16384, 16), (1, 32768, 16), (1, 65536, 8))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--stages", default="2",
                        help="the forward's K/V pipeline depths to time (3 overflows shared memory at head_dim 128)")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    rows = []
    for batch, seq, heads in SHAPES:
        for causal in (False, True):
            keys = jax.random.split(jax.random.key(seq), 3)
            q, k, v = (jax.random.normal(key, (batch, seq, heads, 128), jnp.float32).astype(jnp.bfloat16)
                       for key in keys)
            flops = 4 * batch * heads * seq * seq * 128 / (2 if causal else 1)
            do = jax.random.normal(jax.random.key(7), q.shape, jnp.float32).astype(jnp.bfloat16)
            forwards = {
                "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                      implementation="cudnn"),
                "pallas": lambda q, k, v: attention(q, k, v, causal=causal, impl="pallas")[0],
            }
            for stages in map(int, args.stages.split(",")):
                forwards[f"mosaic_s{stages}"] = lambda q, k, v, n=stages: flash_forward.flash_forward(
                    q, k, v, causal=causal, stages=n)[0]

            def gradients(attend):
                def loss(q, k, v):
                    return jnp.sum(attend(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
                return jax.grad(loss, (0, 1, 2))

            def mosaic(q, k, v):
                return flash_backward.flash_attention(q, k, v, causal=causal)[0]
            backwards = {"cudnn": gradients(forwards["cudnn"]), "pallas": gradients(forwards["pallas"]),
                         "mosaic": gradients(mosaic)}
            passes = {"fwd": (forwards, 1), "fwd+bwd": (backwards, 3.5)}
            for pass_, (calls, factor) in passes.items():
                row = {"B": batch, "N": seq, "H": heads, "causal": causal, "pass": pass_, "ms": {}, "tflops": {},
                       "err": {}}
                want = jax.tree.map(lambda x: x.astype(jnp.float32), jax.jit(calls["cudnn"])(q, k, v))
                for name, call in calls.items():
                    try:
                        f = jax.jit(call)
                        got = f(q, k, v)
                        row["err"][name] = max(float(jnp.abs(g.astype(jnp.float32) - w).max())
                                               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
                        ms = time_calls(f, q, k, v, iters=10).median_ms
                        row["ms"][name], row["tflops"][name] = ms, factor * flops / ms / 1e9
                    except Exception as e:  # noqa: BLE001
                        row["err"][name] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    names = list(dict.fromkeys(name for row in rows for name in row["err"]))
    print("\n| B | N | H | causal | pass | " + " | ".join(names) + " | best mosaic / cudnn |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    for row in rows:
        t = row["tflops"]
        best = max((v for name, v in t.items() if name.startswith("mosaic")), default=float("nan"))
        cells = " | ".join(f"{t[name]:.0f}" if name in t else ("err" if name in row["err"] else "")
                           for name in names)
        print(f"| {row['B']} | {row['N']} | {row['H']} | {row['causal']} | {row['pass']} | {cells} | "
              f"{best / t.get('cudnn', float('nan')):.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
