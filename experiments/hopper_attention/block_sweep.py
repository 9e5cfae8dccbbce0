"""The Hopper forward's key block and ring depth against cuDNN, in one process (issue #4).

    PYTHONPATH=src python3 experiments/hopper_attention/block_sweep.py --out sweep.json

For each shape and causal flag: cuDNN's forward (`jax.nn.dot_product_attention`, the anchor) and
`attention_hopper.flash_forward` with each variant of --variants, timed by `longseq.bench.timing` (median of
--iters calls); each variant's output is checked against cuDNN's (relative error of the norm) before it is
timed. A variant is block_kv x stages, block_kv 0 being `block_kv_for`'s choice. With --fwd-bwd, variants with
block_kv 0 are also timed forward + backward (the gradient of sum(out · w) through `hopper_attention`) beside
cuDNN's.
Prints a table of TFLOP/s and × cuDNN, and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from longseq.bench.timing import time_calls
from longseq.ops.attention_hopper import flash_forward, hopper_attention

SHAPES = ((4, 4096, 16), (1, 16384, 16), (1, 32768, 16), (1, 65536, 8))   # batch, seq, heads; head_dim 128
HEAD_DIM = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="128x2,192x2,128x3", help="block_kv x stages, comma separated")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="batch x seq x heads, comma separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--fwd-bwd", action="store_true", help="also forward + backward (block_kv 0 variants)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",")]
    rows = []
    for batch, seq, heads in [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]:
        keys = jax.random.split(jax.random.key(seq), 3)
        q, k, v = (jax.random.normal(key, (batch, seq, heads, HEAD_DIM), jnp.bfloat16) for key in keys)
        for causal in (False, True):
            flops = 4 * batch * heads * seq * seq * HEAD_DIM / (2 if causal else 1)
            w = jax.random.normal(keys[0], q.shape, jnp.bfloat16)

            def gradient(attend):
                return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w), (0, 1, 2)))
            cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                        implementation="cudnn"))
            want = cudnn(q, k, v).astype(jnp.float32)
            t_ref = time_calls(cudnn, q, k, v, iters=args.iters).median_ms
            row = dict(batch=batch, seq=seq, heads=heads, causal=causal, cudnn_ms=t_ref,
                       cudnn_tflops=flops / t_ref / 1e9)
            if args.fwd_bwd:
                row["cudnn_fwd_bwd_ms"] = time_calls(gradient(cudnn), q, k, v, iters=args.iters).median_ms
            for block_kv, stages in variants:
                name = f"{block_kv}x{stages}"
                fn = jax.jit(lambda q, k, v: flash_forward(q, k, v, causal=causal, block_kv=block_kv or None,
                                                           stages=stages)[0])
                try:
                    got = fn(q, k, v).astype(jnp.float32)
                except Exception as e:  # a variant that does not compile (registers, shared memory)
                    row[name] = f"failed: {str(e).splitlines()[0][:200]}"
                    continue
                error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                t = time_calls(fn, q, k, v, iters=args.iters).median_ms
                row[name] = dict(ms=t, tflops=flops / t / 1e9, vs_cudnn=t_ref / t, error=error)
                if args.fwd_bwd and not block_kv:
                    step = gradient(lambda q, k, v: hopper_attention(q, k, v, causal=causal)[0])
                    t_fb = time_calls(step, q, k, v, iters=args.iters).median_ms
                    row[name].update(fwd_bwd_ms=t_fb, fwd_bwd_vs_cudnn=row["cudnn_fwd_bwd_ms"] / t_fb)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{jax.devices()[0].device_kind}, bf16, head_dim {HEAD_DIM}: forward TFLOP/s (× cuDNN)")
    names = [f"{b}x{s}" for b, s in variants]
    print("| B × N × H | causal | cuDNN | " + " | ".join(names) + " |")
    for row in rows:
        cells = []
        for n in names:
            cell = row[n]
            if not isinstance(cell, dict):
                cells.append(cell[:40])
                continue
            text = f"{cell['tflops']:.0f} ({cell['vs_cudnn']:.3f}×, err {cell['error']:.1e})"
            if "fwd_bwd_vs_cudnn" in cell:
                text += f"; fwd+bwd {cell['fwd_bwd_vs_cudnn']:.3f}×"
            cells.append(text)
        print(f"| {row['batch']} × {row['seq']} × {row['heads']} | {row['causal']} | {row['cudnn_tflops']:.0f} | "
              + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
