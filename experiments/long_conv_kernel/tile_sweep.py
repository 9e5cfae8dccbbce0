"""Tile sweep of the fused Monarch kernel (block_c channels per program, warps) against fft and the
anchors' jnp.fft formula, bf16, causal, forward and forward+backward. Run on a GPU:

    PYTHONPATH=src python3 experiments/long_conv_kernel/tile_sweep.py

Results (H100, 2026-11-23) are summarised in docs/long_conv.md.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from longseq.ops.long_conv_monarch_pallas import long_conv_monarch_pallas, make_plan
from longseq.ops.long_conv_monarch import long_conv_monarch_xla
from longseq.ops import long_conv
from longseq.bench.timing import time_calls

def anchor(u, k):  # u [B,H,N], k [H,N]
    n = u.shape[-1]
    y = jnp.fft.irfft(jnp.fft.rfft(u.astype(jnp.float32), 2*n) * jnp.fft.rfft(k.astype(jnp.float32), 2*n), 2*n)[..., :n]
    return y.astype(u.dtype)

rows = []
for B, H, N in [(8,768,1024),(8,768,4096),(8,768,8192)]:
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.standard_normal((B, N, H)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((H, N)) / np.sqrt(N), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((B, N, H)), jnp.bfloat16)
    ut = jnp.swapaxes(u, 1, 2)
    ref = jax.jit(lambda u, k: long_conv(u, k, impl="fft"))(u, k).astype(jnp.float32)
    def t(f, *a):
        return time_calls(jax.jit(f), *a, iters=10, warmup=3).median_ms
    def fb(f):
        return lambda u, k, dy: jax.grad(lambda u, k: jnp.sum(f(u, k).astype(jnp.float32) * dy), argnums=(0, 1))(u, k)
    base = {"fft": t(lambda u, k: long_conv(u, k, impl="fft"), u, k),
            "anchor": t(anchor, ut, k),
            "fft fb": t(fb(lambda u, k: long_conv(u, k, impl="fft")), u, k, dy),
            "anchor fb": t(fb(anchor), ut, k, jnp.swapaxes(dy, 1, 2)),
            "xla_monarch": t(lambda u, k: long_conv_monarch_xla(u, k, causal=True), u, k)}
    print(B, H, N, {a: round(b, 3) for a, b in base.items()}, flush=True)
    for bc, nw in itertools.product([1, 2, 4, 8, 16], [4, 8]):
        f = lambda u, k, bc=bc, nw=nw: long_conv_monarch_pallas(u, k, causal=True, block_c=bc, num_warps=nw)
        try:
            y = jax.jit(f)(u, k).astype(jnp.float32)
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            ms = t(f, u, k)
            msfb = t(fb(f), u, k, dy) if bc in (1, 2, 4) else float("nan")
            print(f"  block_c={bc} warps={nw}: fwd {ms:.3f} ms ({base['fft']/ms:.2f}x fft, {base['anchor']/ms:.2f}x anchor)  fwd+bwd {msfb:.3f} ({base['anchor fb']/msfb:.2f}x anchor) err {err:.1e}", flush=True)
        except Exception as e:
            print(f"  block_c={bc} warps={nw}: FAIL {str(e).splitlines()[0][:200]}", flush=True)
