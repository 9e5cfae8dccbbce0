"""Where the prototype's time goes: the kernel alone (K̂ precomputed), with phases replaced by register
arithmetic (wrong results, timing only). PYTHONPATH=src python3 experiments/long_conv_kernel/ablate_mgpu.py"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import monarch_mgpu  # noqa: E402
from bench_mgpu import median_ms  # noqa: E402

print(jax.devices()[0].device_kind, jax.__version__, flush=True)
print("| n | variant | kernel ms |")
print("|---|---|---|")
for n in (1024, 4096):
    b, h = 8, 768
    u = jax.random.normal(jax.random.key(0), (b * h, n), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (h, n), jnp.float32) / np.sqrt(n)
    khat, consts = monarch_mgpu.kernel_spectrum(k, n), monarch_mgpu.constants(n)
    spectrum = jax.jit(functools.partial(monarch_mgpu.kernel_spectrum, n=n))
    print(f"| {n} | kernel_spectrum (XLA) | {median_ms(spectrum, k):.3f} |", flush=True)
    for ablate in ((), ("khat",), ("twiddle",), ("stage2",), ("khat", "twiddle", "stage2")):
        for wgs in (1, 2):
            f = jax.jit(functools.partial(monarch_mgpu.long_conv_rows, consts=consts, channels=h, ctas=132, wgs=wgs,
                                          ablate=ablate))
            try:
                print(f"| {n} | w{wgs} without {'+'.join(ablate) or 'nothing'} | {median_ms(f, u, khat):.3f} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {n} | w{wgs} {ablate} | {type(e).__name__}: {str(e)[:200]} |", flush=True)
