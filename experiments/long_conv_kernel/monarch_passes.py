"""Prototype (issue #5): the causal Monarch long convolution as three portable Pallas passes through HBM.

NOTES.md ("Past N = 4K") has the reasoning. Each pass is a tiled GEMM with its complex epilogue fused, so no
pass waits on another's phases the way the single Mosaic GPU kernel's chain does
(`monarch_mgpu.py`). The intermediates are complex bf16 in HBM, about 36N bytes per row in all. Same math,
L = 2N = 128 · r2, K̂ in the kernel order of `monarch_mgpu.kernel_spectrum`:

    pass 1   Y1 = (F1[:, :64] @ X) ⊙ T                          per row and block of columns n2
    pass 2   W  = ((Y1 @ F2) ⊙ K̂) @ conj(F2) ⊙ conj(T)          per row and block of 64 k1
    pass 3   y  = Re(conj(F1)[:64, :] @ W)                      per row and block of columns n2

u: [rows, N] bf16, rows = batch · channels in the [batch, channels, seq] layout; r2 in 16 … 128 (N = 1K … 8K).
The backward: du by the same passes with conj(K̂), K̂'s cotangent from pass 1 on u and dy and a reduction
over the batch. `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

R1 = 128
HALF = R1 // 2


def _planes(z: np.ndarray, dtype) -> np.ndarray:
    """A complex matrix as its [re, im] planes (NumPy: constants, never tracers the custom_vjp could close over)."""
    return np.stack([z.real, z.imag]).astype(dtype)


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


def _full(*shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _pass1(x, f1, twiddle, *, tile, options):
    """x: [rows, 64, r2] bf16 -> Y1: [rows, re/im, 128, r2] bf16."""
    rows, _, r2 = x.shape
    return pl.pallas_call(
        _pass1_kernel, grid=(rows, r2 // tile),
        in_specs=[pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)), _full(2, R1, HALF),
                  pl.BlockSpec((2, R1, tile), lambda r, c: (0, 0, c))],
        out_specs=pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)),
        out_shape=jax.ShapeDtypeStruct((rows, 2, R1, r2), jnp.bfloat16), **options,
    )(x, f1, twiddle)


def _pass2(y1, f2, khat, twiddle, *, channels, options):
    rows, _, _, r2 = y1.shape
    return pl.pallas_call(
        _pass2_kernel, grid=(rows, R1 // HALF),
        in_specs=[pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r, 0, k, 0)), _full(2, r2, r2),
                  pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r % channels, 0, k, 0)),
                  pl.BlockSpec((2, HALF, r2), lambda r, k: (0, k, 0))],
        out_specs=pl.BlockSpec((None, 2, HALF, r2), lambda r, k: (r, 0, k, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, 2, R1, r2), jnp.bfloat16), **options,
    )(y1, f2, khat, twiddle)


def _pass3(w, g1, dtype, *, tile, options):
    rows, _, _, r2 = w.shape
    return pl.pallas_call(
        _pass3_kernel, grid=(rows, r2 // tile),
        in_specs=[pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)), _full(2, HALF, R1)],
        out_specs=pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)),
        out_shape=jax.ShapeDtypeStruct((rows, HALF, r2), dtype), **options,
    )(w, g1)


def _cotangent_kernel(yu_ref, yd_ref, f2_ref, out_ref, *, batch, channels):
    """One (channel, block of 64 k1): Σ_b (Re, −Im) of (Y1u_b @ F2) ⊙ conj(Y1d_b @ F2)."""
    channel = pl.program_id(0)
    f_re, f_im = f2_ref[0], f2_ref[1]

    def spectrum(ref, row):
        y_re, y_im = ref[row, 0], ref[row, 1]
        return _dot(y_re, f_re) - _dot(y_im, f_im), _dot(y_re, f_im) + _dot(y_im, f_re)

    def per_row(b, acc):
        row = b * channels + channel
        u_re, u_im = spectrum(yu_ref, row)
        d_re, d_im = spectrum(yd_ref, row)
        return acc[0] + u_re * d_re + u_im * d_im, acc[1] + u_re * d_im - u_im * d_re

    zero = jnp.zeros(out_ref.shape[1:], jnp.float32)
    acc_re, acc_im = jax.lax.fori_loop(0, batch, per_row, (zero, zero))
    out_ref[0] = acc_re
    out_ref[1] = acc_im


def _cotangent(yu, yd, f2, *, channels, options):
    """Y1 of u and of dy: [rows, re/im, 128, r2] -> K̂'s cotangent [channels, re/im, 128, r2] float32."""
    rows, _, _, r2 = yu.shape
    kernel = functools.partial(_cotangent_kernel, batch=rows // channels, channels=channels)
    rows_spec = pl.BlockSpec((rows, 2, HALF, r2), lambda h, k: (0, 0, k, 0))
    return pl.pallas_call(
        kernel, grid=(channels, R1 // HALF),
        in_specs=[rows_spec, rows_spec, _full(2, r2, r2)],
        out_specs=pl.BlockSpec((None, 2, HALF, r2), lambda h, k: (h, 0, k, 0)),
        out_shape=jax.ShapeDtypeStruct((channels, 2, R1, r2), jnp.float32), **options,
    )(yu, yd, f2)


def _check_length(n):
    length = 2 * n
    if length % R1 or not 16 <= length // R1 <= 128 or (length // R1) & (length // R1 - 1):
        raise ValueError(f"u: N = {n}: the prototype takes N = 1024 … 8192, powers of two")


@functools.partial(jax.jit, static_argnames=("channels", "tile", "num_warps", "interpret"))
def long_conv_passes(u, khat, *, channels: int, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """y[r] = causal conv of u[r] with channel (r mod channels)'s kernel. u: [rows, n] bf16;
    khat: [channels, re/im, 128, r2] float32 (`monarch_mgpu.kernel_spectrum(...).reshape(channels, 2, 128, r2)`).
    Differentiable: du is the same passes on dy with conj(K̂); K̂'s cotangent is Σ_b (Re, −Im) Û_b ⊙ conj(D̂_b),
    from pass 1 on u and dy and one reduction kernel per (channel, block of k1)."""
    rows, n = u.shape
    _check_length(n)
    r2 = 2 * n // R1
    tile = min(tile, r2)
    f1, twiddle, f2, g1 = factors(n)
    options = dict(interpret=interpret, compiler_params=_triton(num_warps, interpret))

    def forward(u, khat):
        y1 = _pass1(u.reshape(rows, HALF, r2), f1, twiddle, tile=tile, options=options)
        w = _pass2(y1, f2, khat, twiddle, channels=channels, options=options)
        return _pass3(w, g1, u.dtype, tile=tile, options=options).reshape(rows, n)

    @jax.custom_vjp
    def conv(u, khat):
        return forward(u, khat)

    def conv_fwd(u, khat):
        return forward(u, khat), (u, khat)

    def conv_bwd(residuals, dy):
        u, khat = residuals
        dy = dy.astype(u.dtype)
        du = forward(dy, khat.at[:, 1].multiply(-1.0))
        yu = _pass1(u.reshape(rows, HALF, r2), f1, twiddle, tile=tile, options=options)
        yd = _pass1(dy.reshape(rows, HALF, r2), f1, twiddle, tile=tile, options=options)
        return du, _cotangent(yu, yd, f2, channels=channels, options=options)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(u, khat)


def long_conv_bhn(u, k, *, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """u: [B, H, N] bf16, k: [H, kernel_len <= N] -> y: [B, H, N] bf16; differentiable in u and k."""
    from monarch_mgpu import kernel_spectrum  # the same K̂, in the same order

    batch, channels, n = u.shape
    khat = kernel_spectrum(k, n).reshape(channels, 2, R1, 2 * n // R1)
    y = long_conv_passes(u.reshape(batch * channels, n), khat, channels=channels, tile=tile, num_warps=num_warps,
                         interpret=interpret)
    return y.reshape(batch, channels, n)
