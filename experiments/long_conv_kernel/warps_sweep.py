"""Pass C's warps and pipeline stages at 256K and 1M, where its blocks are largest (one H200).

At 256K neither changed anything (NOTES.md).

    PYTHONPATH=src python3 experiments/long_conv_kernel/warps_sweep.py

Times the forward pass C alone (`pass_functions`) and the whole forward + backward (`conv_rows`) with the
compiler parameters patched, warps in C capped at 16 (the default) or 32, stages 1 or 2.
"""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as pltriton

from longseq.ops import long_conv_monarch_passes as passes

sys.path.insert(0, os.path.dirname(__file__))
from bench_passes import median_ms  # noqa: E402


def patched(cap, stages):
    def compiler(self, slab=None):
        warps = 8 if slab is None else max(8, min(cap, slab.outer * slab.group * slab.inner // 1024))
        return dict(compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages))
    return compiler


default = passes._Config.compiler
for (b, h, n), cap, stages in itertools.product(((1, 768, 1 << 18), (1, 256, 1 << 20)), (16, 32), (1, 2)):
    passes._Config.compiler = patched(cap, stages)
    rows = b * h
    u = jax.random.normal(jax.random.key(0), (rows, n), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (h, n), jnp.float32) / np.sqrt(n)
    khat = passes.kernel_spectrum(k, passes.plan(n))
    fns = passes.pass_functions(rows, n, h)
    y1 = jax.jit(fns["A"])(u)
    try:
        c_ms = median_ms(jax.jit(fns["C"]), y1, khat.astype(jnp.bfloat16))
        step = jax.jit(jax.value_and_grad(
            lambda u, kh: jnp.sum(passes.conv_rows(u, kh, channels=h).astype(jnp.float32)), (0, 1)))
        full_ms = median_ms(step, u, khat)
        print(f"{b}x{h}x{n} warps<={cap} stages={stages}: C fwd {c_ms:.2f} ms, whole fwd+bwd {full_ms:.2f} ms",
              flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{b}x{h}x{n} warps<={cap} stages={stages}: {type(e).__name__}: {str(e)[:200]}", flush=True)
passes._Config.compiler = default
