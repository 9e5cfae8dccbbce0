"""Check and time the Mosaic GPU Monarch prototype (monarch_mgpu.py) beside jnp.fft, on one GPU.

    PYTHONPATH=src python3 experiments/long_conv_kernel/bench_mgpu.py [--out rows.json]

Causal, bf16 u: [B, H, N] (the anchor's layout, ../shared/anchors/README.md), kernel k: [H, N] float32. Every
variant includes the kernel's spectrum. Errors are against the float32 jnp.fft result. Variants:
  v3: `long_conv_rows`: rows in [batch, channel] order, K̂ from global memory per row, K̂ by jnp.fft;
  v4: `long_conv_grouped` with group 1: a warpgroup takes one channel's rows in turn with its K̂ in shared
      memory; K̂ by the kernel's two factors as XLA matmuls;
  v5: `long_conv_grouped` at its default group (4 rows per phase at 1K, 2 at 2K), with 2 or 3 warpgroups;
  v6: v5 with the twiddles and K̂ in bf16 (room for 2 warpgroups at 4K, or 2 rows per phase: v6_g2), and
      with P as an A operand from registers (v6_preg);
  passes: `monarch_passes.py`, portable Pallas (Triton) passes through HBM: three for N <= 8K, five up to 1M.
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
import monarch_passes  # noqa: E402


def median_ms(fn, *args, repeats=5, calls=20):
    """Milliseconds per call with `calls` calls dispatched back to back before one wait (median of `repeats`):
    the device's time per call, without the host's dispatch latency (about 0.1 ms a call, which per-call
    timing adds to every row). The 2026-11-30 rows in NOTES.md were timed one call at a time."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return float(np.median(times))


def rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


VARIANTS = {
    "v3": functools.partial(monarch_mgpu.long_conv_bhn, row_major=True, spectrum=monarch_mgpu.kernel_spectrum_fft),
    "v4": functools.partial(monarch_mgpu.long_conv_bhn, group=1),
    "v5": monarch_mgpu.long_conv_bhn,
    "v5_w3": functools.partial(monarch_mgpu.long_conv_bhn, wgs=3),
    "v6": functools.partial(monarch_mgpu.long_conv_bhn, wgs=2, table_dtype=jnp.bfloat16),
    "v6_preg": functools.partial(monarch_mgpu.long_conv_bhn, wgs=2, table_dtype=jnp.bfloat16, p_in_registers=True),
    "v6_g2": functools.partial(monarch_mgpu.long_conv_bhn, wgs=1, group=2, table_dtype=jnp.bfloat16),
    "passes": lambda u, k, ctas=None: monarch_passes.long_conv_bhn(u, k),  # (ctas: unused)
    "passes_w8": lambda u, k, ctas=None: monarch_passes.long_conv_bhn(u, k, num_warps=8),
}
# v5 is v4 at 4K; no room for 3 warpgroups past 1K; v6_g2 is v6 at 2K
SKIP = {("v5", 4096), ("v5_w3", 2048), ("v5_w3", 4096), ("v6_g2", 1024), ("v6_g2", 2048)}


def skipped(name: str, n: int) -> bool:
    """Variants that do not take this length: the Mosaic ones stop at 4K."""
    return (name, n) in SKIP or (n > 4096 and not name.startswith("passes"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8x768x1024,8x768x2048,8x768x4096,8x768x8192",
                        help="B x H x N, comma-separated; the anchors' long ones: 8x768x16384,4x768x65536,"
                             "1x768x262144,1x256x1048576 (only the passes take N > 8K)")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    for n in (1024, 2048, 4096, 8192):  # 20 rows of 5 channels over 2 CTAs: warpgroups with 0, 1 and 2 channels
        u = jax.random.normal(jax.random.key(n), (4, 5, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(jax.random.key(n + 1), (5, n - 3), jnp.float32) / np.sqrt(n)
        for name, conv in VARIANTS.items():
            if skipped(name, n):
                continue
            try:
                err = rel_err(conv(u, k, ctas=2), monarch_mgpu.reference_bhn(u.astype(jnp.float32), k))
                print(f"check {name} n={n} (kernel_len n-3): rel err {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"check {name} n={n}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    fft = jax.jit(monarch_mgpu.reference_bhn)
    rows = []
    for shape in args.shapes.split(","):
        b, h, n = map(int, shape.split("x"))
        u = jax.random.normal(jax.random.key(0), (b, h, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (h, n), jnp.float32) / np.sqrt(n)
        dy = jax.random.normal(jax.random.key(2), (b, h, n), jnp.float32).astype(jnp.bfloat16)
        row = {"shape": shape, "fwd": {"fft": median_ms(fft, u, k)}, "fwd+bwd": {}, "err": {}}
        for name, spectrum in (("spectrum_fft", monarch_mgpu.kernel_spectrum_fft),
                               ("spectrum_matmul", monarch_mgpu.kernel_spectrum)):
            row["fwd"][name] = median_ms(jax.jit(functools.partial(spectrum, n=n)), k)
        ref = fft(u.astype(jnp.float32), k)
        for name in VARIANTS:
            if skipped(name, n):
                continue
            try:
                f = jax.jit(VARIANTS[name])
                row["err"][name] = rel_err(f(u, k), ref)
                row["fwd"][name] = median_ms(f, u, k)
            except Exception as e:  # noqa: BLE001
                row["err"][name] = f"{type(e).__name__}: {str(e)[:300]}"

        def fwd_bwd(conv):
            def loss(u, k):
                return jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))
            return jax.jit(jax.grad(loss, (0, 1)))

        row["fwd+bwd"]["fft"] = median_ms(fwd_bwd(monarch_mgpu.reference_bhn), u, k)
        ref_du, ref_dk = fwd_bwd(lambda u, k: monarch_mgpu.reference_bhn(u.astype(jnp.float32), k))(u, k)
        for name in ("v3", "v5", "v6", "passes"):
            if skipped(name, n):
                continue
            try:
                g = fwd_bwd(VARIANTS[name])
                du, dk = g(u, k)
                row["err"][name + "_du"], row["err"][name + "_dk"] = rel_err(du, ref_du), rel_err(dk, ref_dk)
                row["fwd+bwd"][name] = median_ms(g, u, k)
            except Exception as e:  # noqa: BLE001
                row["err"][name + "_fb"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    nan = float("nan")
    print("\n| shape | pass | jnp.fft ms | " + " | ".join(VARIANTS) + " | jnp.fft / best | K̂ by fft / by matmuls (ms) |")
    print("|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for row in rows:
        for p in ("fwd", "fwd+bwd"):
            t = row[p]
            best = min((t[name] for name in VARIANTS if name in t), default=nan)
            spectra = f"{t['spectrum_fft']:.3f} / {t['spectrum_matmul']:.3f}" if p == "fwd" else ""
            cells = " | ".join(f"{t.get(name, nan):.3f}" for name in VARIANTS)
            print(f"| {row['shape']} | {p} | {t['fft']:.3f} | {cells} | {t['fft'] / best:.2f}x | {spectra} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
