"""On a Hopper GPU: the Hopper Monarch path of `longseq.ops.long_conv` checked at full size (forward and gradients
against the float32 FFT implementation), and timed beside what it replaces.

    PYTHONPATH=src python3 experiments/long_conv_kernel/check_hopper.py [--out rows.json]

Shapes: u [8, N, 768] bf16 (the layers' layout), k [768, N] float32, causal. Per N, forward and forward+backward
milliseconds of:
  hopper     long_conv(impl="monarch") (the Hopper kernels, with the layout change and the padding);
  rows       the forward kernel alone on u already in rows ([B·H, N]: what the layout change costs);
  portable   the fused portable Pallas kernel (long_conv_monarch_pallas), which "monarch" took before;
  fft        long_conv(impl="fft");
  gated_*    the H3 / Hyena gate u ⊙ (k ∗ u + u) through gated_long_conv(impl="monarch") (hopper: the formula
             around the Hopper kernels) and the portable kernel with the gate fused (what it took before).
`longseq bench long_conv` gives the anchor's ratios; this script answers where the time between them goes.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from longseq.bench.timing import time_calls
from longseq.ops import gated_long_conv, long_conv
from longseq.ops import long_conv_monarch_hopper as hopper
from longseq.ops import long_conv_monarch_pallas as portable


def rel_err(got, want):
    return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def fwd_bwd(conv, dy):
    def loss(u, k):
        return jnp.sum(conv(u, k).astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.jit(jax.grad(loss, (0, 1)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--seqs", default="1000,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=768)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(device.device_kind, jax.__version__, "SMs:", getattr(device, "core_count", None),
          "on_hopper:", hopper.on_hopper(), flush=True)
    rows = []
    for seq in map(int, args.seqs.split(",")):
        keys = jax.random.split(jax.random.key(seq), 3)
        u = jax.random.normal(keys[0], (args.batch, seq, args.channels), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(keys[1], (args.channels, seq), jnp.float32) / np.sqrt(seq)
        dy = jax.random.normal(keys[2], (args.batch, seq, args.channels), jnp.float32).astype(jnp.bfloat16)
        skip = jnp.ones((args.channels,), jnp.float32)
        plain = jax.jit(lambda u, k: long_conv(u.astype(jnp.float32), k, impl="fft"))
        gated = jax.jit(lambda u, k: u.astype(jnp.float32) * (plain(u, k) + u.astype(jnp.float32)))
        references = {ref: (ref, *fwd_bwd(ref, dy)(u, k)) for ref in (plain, gated)}
        convs = {
            "hopper": (lambda u, k: long_conv(u, k, impl="monarch"), plain),
            "portable": (lambda u, k: portable.long_conv_monarch_pallas(u, k, causal=True), plain),
            "fft": (lambda u, k: long_conv(u, k, impl="fft"), plain),
            "gated_hopper": (lambda u, k: gated_long_conv(u, k, u, skip, impl="monarch"), gated),
            "gated_portable": (lambda u, k: portable.gated_long_conv_monarch_pallas(u, k, u, skip, causal=True),
                               gated),
        }
        row = {"seq": seq, "fwd": {}, "fwd+bwd": {}, "err": {}}
        for name, (conv, reference) in convs.items():
            try:
                f, g = jax.jit(conv), fwd_bwd(conv, dy)
                du, dk = g(u, k)
                ref, ref_du, ref_dk = references[reference]
                row["err"][name] = [rel_err(f(u, k), ref(u, k)), rel_err(du, ref_du), rel_err(dk, ref_dk)]
                row["fwd"][name] = time_calls(f, u, k, iters=20).median_ms
                row["fwd+bwd"][name] = time_calls(g, u, k, iters=20).median_ms
            except Exception as e:  # noqa: BLE001
                row["err"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        if seq in hopper.LENGTHS:
            u_rows = u.transpose(0, 2, 1).reshape(-1, seq)
            k_rows = hopper.kernel_rows(k, seq)
            interpret = hopper.interpret_params() if device.platform == "cpu" else None  # a CPU smoke run
            rows_fn = jax.jit(lambda x, kr: hopper.conv_rows(x, kr, channels=args.channels, interpret=interpret,
                                                             group=math.gcd(args.batch, hopper.default_group(seq)),
                                                             ctas=getattr(device, "core_count", 2)))
            row["fwd"]["rows"] = time_calls(rows_fn, u_rows, k_rows, iters=20).median_ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    nan = float("nan")
    names = ("hopper", "rows", "portable", "fft", "gated_hopper", "gated_portable")
    print("\n| N | pass | " + " | ".join(names) + " | fft / hopper | portable / hopper |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for row in rows:
        for p in ("fwd", "fwd+bwd"):
            t = row[p]
            cells = " | ".join(f"{t.get(name, nan):.3f}" for name in names)
            h = t.get("hopper", nan)
            ratios = f"{t.get('fft', nan) / h:.2f}x | {t.get('portable', nan) / h:.2f}x"
            print(f"| {row['seq']} | {p} | {cells} | {ratios} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
