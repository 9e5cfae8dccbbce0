"""Prototype (issue #5): the causal Monarch long convolution as three portable Pallas passes through HBM.

NOTES.md ("Past N = 4K") has the reasoning. Each pass is a tiled GEMM with its complex epilogue fused, so no
pass waits on another's phases the way the single Mosaic GPU kernel's chain does
(`monarch_mgpu.py`). The intermediates are complex bf16 in HBM, about 36N bytes per row in all. Same math,
L = 2N = 128 · r2, K̂ in the kernel order of `monarch_mgpu.kernel_spectrum`:

    pass 1   Y1 = (F1[:, :64] @ X) ⊙ T                          per row and block of columns n2
    pass 2   W  = ((Y1 @ F2) ⊙ K̂) @ conj(F2) ⊙ conj(T)          per row and block of 64 k1
    pass 3   y  = Re(conj(F1)[:64, :] @ W)                      per row and block of columns n2

u: [rows, N] bf16, rows = batch · channels in the [batch, channels, seq] layout. Forward only, r2 in 16 … 128
(N = 1K … 8K). `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

R1 = 128
HALF = R1 // 2


def _planes(z: np.ndarray, dtype) -> jax.Array:
    """A complex matrix as its [re, im] planes."""
    return jnp.asarray(np.stack([z.real, z.imag]), dtype)


def factors(n: int):
    """(f1 [2, 128, 64] bf16, twiddle [2, 128, r2] f32, f2 [2, r2, r2] bf16, g1 [2, 64, 128] bf16) for N = n."""
    length = 2 * n
    r2 = length // R1
    k1 = np.arange(R1)
    f1 = np.exp(-2j * np.pi * np.outer(k1, np.arange(HALF)) / R1)
    twiddle = np.exp(-2j * np.pi * np.outer(k1, np.arange(r2)) / length)
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(r2), np.arange(r2)) / r2)
    return (_planes(f1, jnp.bfloat16), _planes(twiddle, jnp.float32), _planes(f2, jnp.bfloat16),
            _planes(f1.T, jnp.bfloat16))


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _pass1_kernel(x_ref, f1_ref, tw_ref, y1_ref):
    x = x_ref[...]                                           # [64, tile] bf16
    a_re, a_im = _dot(f1_ref[0], x), _dot(f1_ref[1], x)      # [128, tile]
    t_re, t_im = tw_ref[0], tw_ref[1]
    y1_ref[0] = (a_re * t_re - a_im * t_im).astype(y1_ref.dtype)
    y1_ref[1] = (a_re * t_im + a_im * t_re).astype(y1_ref.dtype)


def _pass2_kernel(y1_ref, f2_ref, kh_ref, tw_ref, w_ref):
    y_re, y_im = y1_ref[0], y1_ref[1]                        # [64, r2] bf16
    f_re, f_im = f2_ref[0], f2_ref[1]
    z_re = _dot(y_re, f_re) - _dot(y_im, f_im)
    z_im = _dot(y_re, f_im) + _dot(y_im, f_re)
    k_re, k_im = kh_ref[0], kh_ref[1]
    p_re = (z_re * k_re - z_im * k_im).astype(jnp.bfloat16)
    p_im = (z_re * k_im + z_im * k_re).astype(jnp.bfloat16)
    w_re = _dot(p_re, f_re) + _dot(p_im, f_im)               # × conj(F2)
    w_im = _dot(p_im, f_re) - _dot(p_re, f_im)
    t_re, t_im = tw_ref[0], tw_ref[1]
    w_ref[0] = (w_re * t_re + w_im * t_im).astype(w_ref.dtype)  # × conj(T)
    w_ref[1] = (w_im * t_re - w_re * t_im).astype(w_ref.dtype)


def _pass3_kernel(w_ref, g1_ref, y_ref):
    y = _dot(g1_ref[0], w_ref[0]) + _dot(g1_ref[1], w_ref[1])  # Re(conj(G) W) = G_re W_re + G_im W_im
    y_ref[...] = y.astype(y_ref.dtype)


def _triton(num_warps: int, interpret: bool):
    """Triton compiler parameters (pallas_call on a GPU otherwise lowers through Mosaic GPU)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


@functools.partial(jax.jit, static_argnames=("channels", "tile", "num_warps", "interpret"))
def long_conv_passes(u, khat, *, channels: int, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """y[r] = causal conv of u[r] with channel (r mod channels)'s kernel. u: [rows, n] bf16;
    khat: [channels, re/im, 128, r2] float32 (`monarch_mgpu.kernel_spectrum(...).reshape(channels, 2, 128, r2)`)."""
    rows, n = u.shape
    length = 2 * n
    if length % R1 or not 16 <= length // R1 <= 128 or (length // R1) & (length // R1 - 1):
        raise ValueError(f"u: N = {n}: the prototype takes N = 1024 … 8192, powers of two")
    r2 = length // R1
    tile = min(tile, r2)
    f1, twiddle, f2, g1 = factors(n)
    x = u.reshape(rows, HALF, r2)
    full = lambda *shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    options = dict(interpret=interpret, compiler_params=_triton(num_warps, interpret))

    y1 = pl.pallas_call(
        _pass1_kernel, grid=(rows, r2 // tile),
        in_specs=[pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)), full(2, R1, HALF),
                  pl.BlockSpec((2, R1, tile), lambda r, c: (0, 0, c))],
        out_specs=pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)),
        out_shape=jax.ShapeDtypeStruct((rows, 2, R1, r2), jnp.bfloat16), **options,
    )(x, f1, twiddle)
    w = pl.pallas_call(
        _pass2_kernel, grid=(rows, R1 // HALF),
        in_specs=[pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r, 0, k, 0)), full(2, r2, r2),
                  pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r % channels, 0, k, 0)),
                  pl.BlockSpec((2, HALF, r2), lambda r, k: (0, k, 0))],
        out_specs=pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r, 0, k, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, 2, R1, r2), jnp.bfloat16), **options,
    )(y1, f2, khat, twiddle)
    y = pl.pallas_call(
        _pass3_kernel, grid=(rows, r2 // tile),
        in_specs=[pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)), full(2, HALF, R1)],
        out_specs=pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)),
        out_shape=jax.ShapeDtypeStruct((rows, HALF, r2), u.dtype), **options,
    )(w, g1)
    return y.reshape(rows, n)


def long_conv_bhn(u, k, *, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """Forward only. u: [B, H, N] bf16, k: [H, kernel_len <= N] -> y: [B, H, N] bf16."""
    from monarch_mgpu import kernel_spectrum  # the same K̂, in the same order

    batch, channels, n = u.shape
    khat = kernel_spectrum(k, n).reshape(channels, 2, R1, 2 * n // R1)
    y = long_conv_passes(u.reshape(batch * channels, n), khat, channels=channels, tile=tile, num_warps=num_warps,
                         interpret=interpret)
    return y.reshape(batch, channels, n)
