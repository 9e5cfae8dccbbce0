"""Time the pass prototype (monarch_passes.py) beside jnp.fft on one GPU, variant by variant, with its bandwidth.

    PYTHONPATH=src python3 experiments/long_conv_kernel/bench_passes.py --out rows.json [--shapes 8x768x8192,...]
    JAX_PLATFORMS=cpu python3 experiments/long_conv_kernel/bench_passes.py --interpret --shapes 1x2x1024,1x2x16384

Causal, bf16 u: [B, H, N], kernel k: [H, N] float32; every time includes K̂ (jnp.fft of k). For each shape:
jnp.fft (float32 inside, bf16 out), then each variant forward and forward + backward (value_and_grad of
sum(y · dy) in u and k: the forward is not left out), its errors against the float32 jnp.fft results, jnp.fft's
time over its time, and the fraction of the copy bandwidth (x + 1 on 1 GiB of bf16, timed in the same run) that
its model bytes (`monarch_passes.traffic`) over its time make. Then the default's three forward passes one by
one. Variants (options of `monarch_passes.long_conv_passes`):
  new     the defaults;
  old     the old settings: one row per program, K̂ and T2 in float32, no pairs, 4 warps, no pipelining, du and
          K̂'s cotangent in two passes (still three passes at N > 8K, T1 factored, the batch fastest in C's grid);
          past 8K one k1 slab per program of C (no [r2, G, r3] reshapes in registers: the fallback if those fail);
  nopair  new without pairs (the only kind at odd batch, so it is left out there);
  hoist   new with each program's matrices, twiddles and K̂ made before its loop;
  s1      new without software pipelining (num_stages 1);
  big     new with larger programs: tile 128, 8 rows per program in A and A', 16K values per program of C.
Time: shape i of S may start variants other than new and old until start + budget · (i + 1) / S (--budget-s),
so that the long shapes get their share; about 6 minutes for the six default shapes on an H200.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # a previous bench died inside cuFFT at long N

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import monarch_passes  # noqa: E402

VARIANTS = {
    "new": {},
    "old": dict(pair=False, batch_loop=False, khat_dtype=jnp.float32, table_dtype=jnp.float32, tile=64,
                rows_per_program=1, block=8192, num_warps=4, num_stages=1, fuse_backward=False),
    "nopair": dict(pair=False),
    "hoist": dict(hoist=True),
    "s1": dict(num_stages=1),
    "big": dict(tile=128, rows_per_program=8, block=16384),
}
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


def model_bytes(name, batch, channels, n, options):
    """Forward and forward + backward model bytes of a variant (monarch_passes.traffic, all rows)."""
    t = monarch_passes.traffic(n, batch, pair=options.get("pair", True),
                               khat_bytes=jnp.dtype(options.get("khat_dtype", jnp.bfloat16)).itemsize,
                               fuse_backward=options.get("fuse_backward", True))
    rows = batch * channels
    fwd = rows * sum(t["fwd"].values())
    return fwd, fwd + rows * sum(t["bwd"].values())


def main():
    global CALLS, REPEATS
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8x768x4096,8x768x8192,8x768x16384,4x768x65536,1x768x262144,"
                                            "1x256x1048576", help="B x H x N, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=300.0, help="see the module docstring")
    parser.add_argument("--no-passes", action="store_true", help="leave out the per-pass times")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a CPU smoke test)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.interpret:
        CALLS, REPEATS = 2, 1
    extra = dict(interpret=True) if args.interpret else {}
    bandwidth = copy_bandwidth(args.interpret)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    fft, fft_f32 = jax.jit(reference), jax.jit(lambda u, k: reference(u.astype(jnp.float32), k))
    rows = []
    shapes = args.shapes.split(",")
    for index, shape in enumerate(shapes):
        deadline = start + args.budget_s * (index + 1) / len(shapes)
        b, h, n = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(n), 3)
        u = jax.random.normal(keys[0], (b, h, n), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(keys[1], (h, n), jnp.float32) / np.sqrt(n)
        dy = jax.random.normal(keys[2], (b, h, n), jnp.float32).astype(jnp.bfloat16)
        row = {"shape": shape, "fft": {}, "variants": {}, "passes": {}, "copy_TBps": bandwidth / 1e12}
        try:
            row["fft"]["fwd"] = timed(fft, u, k)
            row["fft"]["fwd+bwd"] = timed(fwd_bwd(reference, dy), u, k)
        except Exception as e:  # noqa: BLE001
            row["fft"]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        want = fft_f32(u, k)
        _, (want_du, want_dk) = fwd_bwd(lambda u, k: reference(u.astype(jnp.float32), k), dy)(u, k)
        for name in args.variants.split(","):
            options = {**VARIANTS[name], **extra}
            if name == "old" and n > 8192:
                options["block"] = 0
            if name == "nopair" and b % 2:
                continue
            if name not in ("new", "old") and time.perf_counter() > deadline:
                row["variants"][name] = {"error": "skipped: time budget"}
                continue
            out = row["variants"][name] = {}
            try:
                conv = jax.jit(functools.partial(monarch_passes.long_conv_bhn, **options))
                out["err_y"] = rel_err(conv(u, k), want)
                out["fwd"] = timed(conv, u, k)
                step = fwd_bwd(functools.partial(monarch_passes.long_conv_bhn, **options), dy)
                _, (du, dk) = step(u, k)
                out["err_du"], out["err_dk"] = rel_err(du, want_du), rel_err(dk, want_dk)
                out["fwd+bwd"] = timed(step, u, k)
                for part, nbytes in zip(("fwd", "fwd+bwd"), model_bytes(name, b, h, n, options)):
                    out[f"{part}_GB"] = nbytes / 1e9
                    out[f"{part}_bw"] = nbytes / (out[part] * 1e-3) / bandwidth
                    if part in row["fft"]:
                        out[f"{part}_speedup"] = row["fft"][part] / out[part]
            except Exception as e:  # noqa: BLE001
                out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        if not args.no_passes:
            try:
                row["passes"] = time_passes(b, h, n, u, k, bandwidth, extra)
            except Exception as e:  # noqa: BLE001
                row["passes"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def time_passes(b, h, n, u, k, bandwidth, options):
    """The default's forward passes one at a time: ms and fraction of the copy bandwidth of each."""
    fns = monarch_passes.pass_functions(b * h, n, h, **options)
    model = monarch_passes.traffic(n, b)["fwd"]
    khat = monarch_passes.kernel_spectrum(k, monarch_passes.plan(n), jnp.bfloat16)
    y1 = jax.jit(fns["A"])(u.reshape(b * h, n))
    w1 = jax.jit(fns["C"])(y1, khat)
    result = {}
    for name, args in (("A", (u.reshape(b * h, n),)), ("C", (y1, khat)), ("A'", (w1,))):
        ms = timed(jax.jit(fns[name]), *args)
        result[name] = {"ms": ms, "bw": b * h * model[name] / (ms * 1e-3) / bandwidth}
    return result


def print_table(rows):
    nan = float("nan")
    print("\n| shape | variant | fwd ms | fft/it | BW | fwd+bwd ms | fft/it | BW | err y / du / dk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fft = row["fft"]
        print(f"| {row['shape']} | jnp.fft | {fft.get('fwd', nan):.3f} | | | {fft.get('fwd+bwd', nan):.3f} | | | |")
        for name, v in row["variants"].items():
            if "error" in v:
                print(f"| | {name} | {v['error'][:80]} | | | | | | |")
                continue
            errs = " / ".join(f"{v.get(e, nan):.1e}" for e in ("err_y", "err_du", "err_dk"))
            print(f"| | {name} | {v.get('fwd', nan):.3f} | {v.get('fwd_speedup', nan):.2f}x | "
                  f"{v.get('fwd_bw', nan):.0%} | {v.get('fwd+bwd', nan):.3f} | {v.get('fwd+bwd_speedup', nan):.2f}x "
                  f"| {v.get('fwd+bwd_bw', nan):.0%} | {errs} |")
        passes = row.get("passes", {})
        if passes and "error" not in passes:
            cells = ", ".join(f"{name} {p['ms']:.3f} ms ({p['bw']:.0%})" for name, p in passes.items())
            print(f"| | new, by pass | {cells} | | | | | | |")
        elif passes:
            print(f"| | new, by pass | {passes['error'][:80]} | | | | | | |")


if __name__ == "__main__":
    main()
