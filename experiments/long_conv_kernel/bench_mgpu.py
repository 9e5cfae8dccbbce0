"""Check and time the Mosaic GPU Monarch prototype (monarch_mgpu.py) beside jnp.fft, on one GPU.

    PYTHONPATH=src python3 experiments/long_conv_kernel/bench_mgpu.py [--out rows.json]

Forward only, causal, bf16 u: [B, H, N] (the anchor's layout, ../shared/anchors/README.md), kernel k: [H, N]
float32. Both sides include the kernel's spectrum. Errors are against the float32 jnp.fft result.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import monarch_mgpu  # noqa: E402


def median_ms(fn, *args, repeats=20):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8x768x1024,8x768x2048,8x768x4096")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    fft = jax.jit(monarch_mgpu.reference_bhn)
    rows = []
    # correctness on an odd row count first (15 rows over 4 warpgroups of 2 CTAs, and over many CTAs)
    for n in (1024, 2048, 4096):
        u = jax.random.normal(jax.random.key(n), (3, 5, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(jax.random.key(n + 1), (5, n), jnp.float32) / np.sqrt(n)
        ref = monarch_mgpu.reference_bhn(u.astype(jnp.float32), k)
        khat, consts = monarch_mgpu.kernel_spectrum(k, n), monarch_mgpu.constants(n)
        for ctas, wgs, transposed_g1 in ((2, 2, True), (132, 2, False), (132, 3, True)):
            label = f"check n={n} ctas={ctas} wgs={wgs} transposed_g1={transposed_g1}"
            try:
                y = monarch_mgpu.long_conv_rows(u.reshape(15, n), khat, consts, channels=5, ctas=ctas, wgs=wgs,
                                                transposed_g1=transposed_g1)
                y = y.reshape(3, 5, n).astype(jnp.float32)
                err = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
                print(f"{label}: rel err {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    for shape in args.shapes.split(","):
        b, h, n = map(int, shape.split("x"))
        u = jax.random.normal(jax.random.key(0), (b, h, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (h, n), jnp.float32) / np.sqrt(n)
        row = {"shape": shape, "fft_ms": median_ms(fft, u, k)}
        ref = fft(u.astype(jnp.float32), k)
        variants = [(f"mgpu_c{c}_w{w}", functools.partial(monarch_mgpu.long_conv_bhn, ctas=c, wgs=w))
                    for c, w in ((132, 2), (132, 3), (264, 1))]
        variants.append(("mgpu_c264_w1_v2", functools.partial(monarch_mgpu.long_conv_bhn, ctas=264, wgs=1,
                                                                rows_fn=monarch_mgpu.long_conv_rows_v2)))
        for name, conv in variants:
            try:
                f = jax.jit(conv)
                y = f(u, k).astype(jnp.float32)
                row[name + "_err"] = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
                row[name + "_ms"] = median_ms(f, u, k)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        dy = jax.random.normal(jax.random.key(2), (b, h, n), jnp.float32).astype(jnp.bfloat16)

        def fwd_bwd(conv):
            def loss(u, k):
                return jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))
            return jax.jit(jax.grad(loss, (0, 1)))

        row["fft_fb_ms"] = median_ms(fwd_bwd(monarch_mgpu.reference_bhn), u, k)
        ref_du, ref_dk = fwd_bwd(lambda u, k: monarch_mgpu.reference_bhn(u.astype(jnp.float32), k))(u, k)
        for ctas, wgs in ((132, 2), (132, 3)):
            name = f"mgpu_fb_c{ctas}_w{wgs}"
            try:
                g = fwd_bwd(lambda u, k, c=ctas, w=wgs: monarch_mgpu.long_conv_bhn(u, k, ctas=c, wgs=w))
                du, dk = g(u, k)
                row[name + "_du_err"] = float(jnp.abs(du.astype(jnp.float32) - ref_du).max() / jnp.abs(ref_du).max())
                row[name + "_dk_err"] = float(jnp.abs(dk - ref_dk).max() / jnp.abs(ref_dk).max())
                row[name + "_ms"] = median_ms(g, u, k)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        # our public API's layout [B, N, H]: the transposes around the kernel
        f = jax.jit(lambda u, k: monarch_mgpu.long_conv_bhn(u.transpose(0, 2, 1), k).transpose(0, 2, 1))
        try:
            row["mgpu_bnh_ms"] = median_ms(f, u.transpose(0, 2, 1), k)
        except Exception as e:  # noqa: BLE001
            row["mgpu_bnh_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| shape | pass | jnp.fft ms | best mgpu ms | variant | fft / mgpu |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for label, prefix, fft_key in (("fwd", "mgpu_c", "fft_ms"), ("fwd+bwd", "mgpu_fb_c", "fft_fb_ms")):
            timed = {k[:-3]: v for k, v in row.items() if k.startswith(prefix) and k.endswith("_ms")}
            if timed:
                best = min(timed, key=timed.get)
                print(f"| {row['shape']} | {label} | {row[fft_key]:.3f} | {timed[best]:.3f} | {best} | "
                      f"{row[fft_key] / timed[best]:.2f}x |")
            else:
                print(f"| {row['shape']} | {label} | {row[fft_key]:.3f} | — | — | — |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
