"""On a Hopper GPU: the compiled prototype kernels against longseq's reference attention (float32 inputs), forward
and gradients, on the cases the CPU tests run in the interpreter plus a larger one. Run it before bench.py, under
a timeout: a barrier that never completes would hang here, on small shapes, rather than in the bench.

    PYTHONPATH=src timeout 120 python3 experiments/hopper_attention/check.py [case index ...]
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

from longseq.ops import attention

sys.path.insert(0, os.path.dirname(__file__))
import flash_backward  # noqa: E402

CASES = [  # (q_len, kv_len, heads, kv_heads, head_dim, options)
    (256, 256, 2, 1, 64, dict(causal=False)),
    (256, 256, 2, 2, 128, dict(causal=True)),
    (130, 190, 2, 1, 64, dict(causal=True, window=70, q_offset=150, kv_offset=100)),
    (130, 190, 2, 1, 64, dict(causal=False, window=50, q_offset=30, segments=True)),
    (640, 640, 2, 1, 128, dict(causal=False)),   # more key blocks than pipeline slots: the ring wraps
    (2048, 2048, 4, 2, 128, dict(causal=True)),
]


def main():
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    on_cpu = jax.devices()[0].platform == "cpu"   # a smoke run of this script: the interpreter, small cases
    worst = 0.0
    chosen = [CASES[int(i)] for i in sys.argv[1:]] or (CASES[:2] if on_cpu else CASES)
    for q_len, kv_len, heads, kv_heads, head_dim, options in chosen:
        options = dict(options)
        interpret = flash_backward.interpret_params() if on_cpu else None
        if options.pop("segments", False):
            options["segment_ids"] = (jnp.arange(q_len)[None] // 50, jnp.arange(kv_len)[None] // 70)
        keys = jax.random.split(jax.random.key(q_len + kv_len + head_dim), 5)
        q = jax.random.normal(keys[0], (1, q_len, heads, head_dim), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, kv_len, kv_heads, head_dim), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, kv_len, kv_heads, head_dim), jnp.float32).astype(jnp.bfloat16)
        do = jax.random.normal(keys[3], q.shape, jnp.float32).astype(jnp.bfloat16)
        dlse = jax.random.normal(keys[4], (1, heads, q_len), jnp.float32)

        def vjp(attend, *args):
            (out, lse), pullback = jax.vjp(attend, *args)
            return (out, lse, *pullback((do.astype(out.dtype), dlse)))

        start = time.perf_counter()   # the forward alone first: a hang shows which kernel it is in
        jax.block_until_ready(flash_backward.flash_attention(q, k, v, interpret=interpret, **options))
        print(f"  forward ran in {time.perf_counter() - start:.1f} s (compile included)", flush=True)
        got = jax.jit(lambda q, k, v: vjp(lambda *a: flash_backward.flash_attention(*a, interpret=interpret, **options),
                                          q, k, v))(q, k, v)
        want = vjp(lambda *a: attention(*a, impl="reference", **options), *(x.astype(jnp.float32) for x in (q, k, v)))
        errors = []
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            finite = jnp.isfinite(w)
            assert bool(jnp.all(jnp.isfinite(g) == finite)), f"{name}: non-finite values where the reference has none"
            g, w = jnp.where(finite, g.astype(jnp.float32), 0.0), jnp.where(finite, w, 0.0)
            errors.append(float(jnp.abs(g - w).max() / jnp.abs(w).max()))
        worst = max(worst, *errors)
        shown = {key: value for key, value in options.items() if key != "segment_ids"}
        print(f"q {q_len} kv {kv_len} heads {heads}/{kv_heads} d {head_dim} {shown}"
              f"{' segments' if 'segment_ids' in options else ''}: rel err out/lse/dq/dk/dv "
              + " ".join(f"{e:.1e}" for e in errors), flush=True)
    print(f"worst {worst:.1e}: {'ok' if worst < 2e-2 else 'FAILED'}")
    sys.exit(0 if worst < 2e-2 else 1)


if __name__ == "__main__":
    main()
