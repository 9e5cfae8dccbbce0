"""Time the passes of `longseq.ops.long_conv_monarch_passes` on rows (u: [B, H, N], no layout change) beside
jnp.fft on the same layout, with each forward pass's fraction of the copy bandwidth.

    PYTHONPATH=src python3 experiments/long_conv_kernel/bench_passes.py --out rows.json [--shapes 8x768x8192,...]
    JAX_PLATFORMS=cpu PYTHONPATH=src python3 experiments/long_conv_kernel/bench_passes.py --interpret --shapes 2x2x1024

Causal, bf16 u: [B, H, N], kernel k: [H, N] float32; every time includes K̂ (jnp.fft of k). For each shape:
jnp.fft (float32 inside, bf16 out), then the passes forward and forward + backward (value_and_grad of
sum(y · dy) in u and k: the forward is not left out), their errors against the float32 jnp.fft results,
jnp.fft's time over theirs, and the fraction of the copy bandwidth (x + 1 on 1 GiB of bf16, timed in the same
run) that their model bytes (`traffic`) over their time make; then the three forward passes one by one.
--r1 and --blocking (TILE:ROWS_PER_PROGRAM:BLOCK, the module's constants) time each shape with other settings.
`longseq bench long_conv` times the same passes behind `long_conv(impl="monarch")`, on u: [B, N, H] (with the
layout change).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # a previous bench died inside cuFFT at long N

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longseq.ops import long_conv_monarch_passes as passes  # noqa: E402

CALLS, REPEATS = 20, 5


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


def timed(fn, *args):
    return median_ms(fn, *args, repeats=REPEATS, calls=CALLS)


def reference(u, k):
    """The anchor's formula irfft(rfft(u, 2N) · rfft(k, 2N))[:N] in float32 (output in u's dtype)."""
    n = u.shape[-1]
    spectrum = jnp.fft.rfft(u.astype(jnp.float32), 2 * n) * jnp.fft.rfft(k.astype(jnp.float32), 2 * n)
    return jnp.fft.irfft(spectrum, 2 * n)[..., :n].astype(u.dtype)


def rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def fwd_bwd(conv, dy):
    def loss(u, k):
        return jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def copy_bandwidth(interpret: bool) -> float:
    """Bytes per second of x + 1 on 1 GiB of bf16 (read and write)."""
    x = jnp.ones(((1 << 29) if not interpret else (1 << 20),), jnp.bfloat16)
    return 2 * x.nbytes / (timed(jax.jit(lambda x: x + 1), x) * 1e-3)


def model_bytes(batch, channels, n):
    """Forward and forward + backward model bytes of the passes (`traffic`, all rows)."""
    t = passes.traffic(n, batch)
    rows = batch * channels
    fwd = rows * sum(t["fwd"].values())
    return fwd, fwd + rows * sum(t["bwd"].values())


def conv_bhn(interpret, r1=None):
    """u: [B, H, N] bf16, k: [H, N] -> y: [B, H, N] by the passes, on rows (first factor r1: None, the plan's)."""
    def conv(u, k):
        b, h, n = u.shape
        khat = passes.kernel_spectrum(k, passes.plan(n, r1))
        return passes.conv_rows(u.reshape(b * h, n), khat, channels=h, interpret=interpret,
                                r1=r1).reshape(u.shape)
    return conv


def main():
    global CALLS, REPEATS
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8x768x8192,8x768x16384,4x768x65536,1x768x262144,1x256x1048576",
                        help="B x H x N, comma-separated")
    parser.add_argument("--r1", default="", help="first factors to time each shape with, comma-separated "
                        "(default: the plan's)")
    parser.add_argument("--blocking", default="", help="blockings to time each shape with, comma-separated, each "
                        "TILE:ROWS_PER_PROGRAM:BLOCK (the module's constants; default: as they are)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a CPU smoke test)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.interpret:
        CALLS, REPEATS = 2, 1
    bandwidth = copy_bandwidth(args.interpret)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    fft, fft_f32 = jax.jit(reference), jax.jit(lambda u, k: reference(u.astype(jnp.float32), k))
    rows = []
    first_factors = [int(r) for r in args.r1.split(",") if r] or [None]
    blockings = [tuple(int(x) for x in b.split(":")) for b in args.blocking.split(",") if b] or [None]
    fft_rows = {}
    default_blocking = (passes.TILE, passes.ROWS_PER_PROGRAM, passes.BLOCK)
    for shape, r1, blocking in [(shape, r1, blocking) for shape in args.shapes.split(",") for r1 in first_factors
                                for blocking in blockings]:
        passes.TILE, passes.ROWS_PER_PROGRAM, passes.BLOCK = blocking or default_blocking
        jax.clear_caches()   # conv_rows is jitted on its arguments, not on these constants
        conv = conv_bhn(args.interpret, r1)
        b, h, n = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(n), 3)
        u = jax.random.normal(keys[0], (b, h, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(keys[1], (h, n), jnp.float32) / np.sqrt(n)
        dy = jax.random.normal(keys[2], (b, h, n), jnp.float32).astype(jnp.bfloat16)
        row = {"shape": shape, "r1": passes.plan(n, r1).r1,
               "blocking": ":".join(map(str, (passes.TILE, passes.ROWS_PER_PROGRAM, passes.BLOCK))),
               "fft": {}, "passes": {}, "by_pass": {}, "copy_TBps": bandwidth / 1e12}
        if shape in fft_rows:   # timed once per shape
            row["fft"] = fft_rows[shape]
        else:
            try:
                row["fft"]["fwd"] = timed(fft, u, k)
                row["fft"]["fwd+bwd"] = timed(fwd_bwd(reference, dy), u, k)
            except Exception as e:  # noqa: BLE001
                row["fft"]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            fft_rows[shape] = row["fft"]
        out = row["passes"]
        try:
            out["err_y"] = rel_err(jax.jit(conv)(u, k), fft_f32(u, k))
            out["fwd"] = timed(jax.jit(conv), u, k)
            _, (want_du, want_dk) = fwd_bwd(lambda u, k: reference(u.astype(jnp.float32), k), dy)(u, k)
            step = fwd_bwd(conv, dy)
            _, (du, dk) = step(u, k)
            out["err_du"], out["err_dk"] = rel_err(du, want_du), rel_err(dk, want_dk)
            out["fwd+bwd"] = timed(step, u, k)
            for part, nbytes in zip(("fwd", "fwd+bwd"), model_bytes(b, h, n)):
                out[f"{part}_GB"] = nbytes / 1e9
                out[f"{part}_bw"] = nbytes / (out[part] * 1e-3) / bandwidth
                if part in row["fft"]:
                    out[f"{part}_speedup"] = row["fft"][part] / out[part]
            row["by_pass"] = time_passes(b, h, n, u, k, bandwidth, args.interpret, r1)
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def time_passes(b, h, n, u, k, bandwidth, interpret, r1=None):
    """The three forward passes one at a time: ms and fraction of the copy bandwidth of each."""
    fns = passes.pass_functions(b * h, n, h, interpret, r1)
    model = passes.traffic(n, b)["fwd"]
    khat = passes.kernel_spectrum(k, passes.plan(n, r1), jnp.bfloat16)
    y1 = jax.jit(fns["A"])(u.reshape(b * h, n))
    w1 = jax.jit(fns["C"])(y1, khat)
    result = {}
    for name, args in (("A", (u.reshape(b * h, n),)), ("C", (y1, khat)), ("A'", (w1,))):
        ms = timed(jax.jit(fns[name]), *args)
        result[name] = {"ms": ms, "bw": b * h * model[name] / (ms * 1e-3) / bandwidth}
    return result


def print_table(rows):
    nan = float("nan")
    print("\n| B × H × N | r1 | tile:rows:block | jnp.fft fwd / fwd+bwd ms | passes fwd / fwd+bwd ms | ratio | "
          "of copy bw | err y / du / dk | by pass (fwd) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fft, v = row["fft"], row["passes"]
        if "error" in v:
            print(f"| {row['shape']} | {row['r1']} | {row['blocking']} | {fft.get('fwd', nan):.3f} / "
                  f"{fft.get('fwd+bwd', nan):.3f} | {v['error'][:80]} | | | | |")
            continue
        errs = " / ".join(f"{v.get(e, nan):.1e}" for e in ("err_y", "err_du", "err_dk"))
        cells = ", ".join(f"{name} {p['ms']:.3f} ({p['bw']:.0%})" for name, p in row["by_pass"].items())
        print(f"| {row['shape']} | {row['r1']} | {row['blocking']} | {fft.get('fwd', nan):.3f} / "
              f"{fft.get('fwd+bwd', nan):.3f} | {v['fwd']:.3f} / {v['fwd+bwd']:.3f} | "
              f"{v.get('fwd_speedup', nan):.2f}× / {v.get('fwd+bwd_speedup', nan):.2f}× | "
              f"{v['fwd_bw']:.0%} / {v['fwd+bwd_bw']:.0%} | {errs} | {cells} |")


if __name__ == "__main__":
    main()
