"""Prototype (issue #5): the causal Monarch long convolution as portable Pallas passes through HBM.

NOTES.md ("Past N = 4K") has the reasoning. Each pass is a tiled GEMM with its complex epilogue fused, so no
pass waits on another's phases the way the single Mosaic GPU kernel's chain does (`monarch_mgpu.py`). The
intermediates are complex bf16 in HBM.

L = 2N = 128 · M. Two factors (M = r2 <= 128, N <= 8K), or three (M = r2 · r3, r3 >= 16, N = 16K … 1M). x is
viewed as X[n1, n2, n3] (n = n1·M + n2·r3 + n3; rows n1 >= 64 are the causal zero padding), the spectrum comes
out as Z[k1, k2, k3] = DFT_L(x)[k1 + 128·k2 + 128·r2·k3], and K̂ is laid out the same way (1/L folded in):

    A    Y1 = (F1[:, :64] @ X) ⊙ T1                 T1[k1, m] = ω_L^(k1·m), m = n2·r3 + n3
    B    Y2 = (F2 @ Y1[k1]) ⊙ T2                    per k1; T2[k2, n3] = ω_M^(k2·n3)          (three factors)
    C    W2 = ((Y2 @ Fl) ⊙ K̂) @ conj(Fl) ⊙ conj(Tc)  Fl: the last factor; Tc = T2 (three), T1 (two)
    B'   W1 = (conj(F2) @ W2[k1]) ⊙ conj(T1)                                                   (three factors)
    A'   y  = Re(conj(F1)[:64, :] @ W1)

With two factors there is no B or B', Y2 = Y1, and C applies conj(T1). About 36N bytes move per row with two
factors, 68N with three. u: [rows, N] bf16, rows = batch · channels in the [batch, channels, seq] layout. The
backward: du by the same passes with conj(K̂); K̂'s cotangent Σ_b (Re, −Im) Û_b ⊙ conj(D̂_b) from A (and B) on
u and dy and one reduction over the batch. `interpret=True` runs it on CPU. Checked in float64 by
`_numpy_model`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

R1 = 128
HALF = R1 // 2
ROWS = 64  # rows of the spectrum per program of pass C


class Plan(NamedTuple):
    n: int
    length: int
    r2: int
    r3: int  # 1: two factors

    @property
    def last(self) -> int:
        """The size of the factor pass C contracts."""
        return self.r3 if self.r3 > 1 else self.r2

    @property
    def spectrum_rows(self) -> int:
        """Pass C's rows: (k1) with two factors, (k1, k2) with three."""
        return self.length // self.last


def plan(n: int) -> Plan:
    """The factors for N = n (a power of two, 1024 … 2^20)."""
    if n < 1024 or n > 1 << 20 or n & (n - 1):
        raise ValueError(f"u: N = {n}: the prototype takes powers of two from 1024 to 1048576")
    length = 2 * n
    m = length // R1
    if m <= 128:
        return Plan(n, length, m, 1)
    r2 = min(128, m // 16)
    return Plan(n, length, r2, m // r2)


def _planes(z: np.ndarray, dtype) -> np.ndarray:
    """A complex matrix as its [re, im] planes (NumPy: constants, never tracers the custom_vjp could close over)."""
    return np.stack([z.real, z.imag]).astype(dtype)


def _dft(r: int) -> np.ndarray:
    return np.exp(-2j * np.pi * np.outer(np.arange(r), np.arange(r)) / r)


class Factors(NamedTuple):
    f1: np.ndarray   # [2, 128, 64] bf16: F1[:, :64]
    g1: np.ndarray   # [2, 64, 128] bf16: F1[:64, :] (A' takes its conjugate)
    t1: np.ndarray   # [2, 128, M] f32
    f2: np.ndarray   # [2, r2, r2] bf16 (three factors)
    t2: np.ndarray   # [2, r2, r3] f32 (three factors)
    fl: np.ndarray   # [2, last, last] bf16: the last factor
    tc: np.ndarray   # [2, spectrum_rows, last] f32: the twiddle pass C conjugates


def factors(p: Plan, matrix_dtype=jnp.bfloat16, table_dtype=np.float32) -> Factors:
    m = p.length // R1
    f1 = _dft(R1)
    t1 = np.exp(-2j * np.pi * np.outer(np.arange(R1), np.arange(m)) / p.length)
    bf16, f32 = matrix_dtype, table_dtype
    if p.r3 == 1:
        f2 = t2 = np.zeros((1, 1))
        tc = t1
    else:
        f2 = _dft(p.r2)
        t2 = np.exp(-2j * np.pi * np.outer(np.arange(p.r2), np.arange(p.r3)) / m)
        tc = np.tile(t2, (R1, 1))  # row k1·r2 + k2
    return Factors(_planes(f1[:, :HALF], bf16), _planes(f1[:HALF, :], bf16), _planes(t1, f32), _planes(f2, bf16),
                   _planes(t2, f32), _planes(_dft(p.last), bf16), _planes(tc, f32))


def kernel_spectrum(k: jax.Array, p: Plan) -> jax.Array:
    """k: [channels, kernel_len <= N] -> K̂: [channels, re/im, spectrum_rows, last] float32, in pass C's order, / L."""
    channels = k.shape[0]
    spectrum = jnp.fft.fft(k.astype(jnp.float32), p.length, axis=-1) / p.length
    if p.r3 == 1:
        spectrum = spectrum.reshape(channels, p.r2, R1).transpose(0, 2, 1)             # [k1, k2]
    else:
        spectrum = spectrum.reshape(channels, p.r3, p.r2, R1).transpose(0, 3, 2, 1)    # [k1, k2, k3]
    spectrum = spectrum.reshape(channels, p.spectrum_rows, p.last)
    return jnp.stack([spectrum.real, spectrum.imag], 1)


# ----------------------------------------------------------------------------------------------
# Kernels (complex values as [re, im] planes on a leading axis)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _times(a_re, a_im, t_ref, conj=False):
    """(a_re + i a_im) · t (or · conj(t)), t: a [2, …] ref."""
    t_re, t_im = t_ref[0], t_ref[1]
    if conj:
        return a_re * t_re + a_im * t_im, a_im * t_re - a_re * t_im
    return a_re * t_re - a_im * t_im, a_re * t_im + a_im * t_re


def _store(ref, re, im):
    ref[0] = re.astype(ref.dtype)
    ref[1] = im.astype(ref.dtype)


def _pass_a_kernel(x_ref, f1_ref, t1_ref, y1_ref):
    x = x_ref[...]                                                   # [64, tile] bf16
    _store(y1_ref, *_times(_dot(f1_ref[0], x), _dot(f1_ref[1], x), t1_ref))


def _pass_b_kernel(y1_ref, f2_ref, t2_ref, y2_ref, *, inverse: bool):
    """Left multiply by F2 (then × T2), or by conj(F2) (then × conj(T1)): [r2, tile] per program."""
    y_re, y_im = y1_ref[0], y1_ref[1]
    f_re, f_im = f2_ref[0], f2_ref[1]
    if inverse:
        re, im = _dot(f_re, y_re) + _dot(f_im, y_im), _dot(f_re, y_im) - _dot(f_im, y_re)
    else:
        re, im = _dot(f_re, y_re) - _dot(f_im, y_im), _dot(f_re, y_im) + _dot(f_im, y_re)
    _store(y2_ref, *_times(re, im, t2_ref, conj=inverse))


def _pass_c_kernel(y_ref, fl_ref, kh_ref, tc_ref, w_ref):
    y_re, y_im = y_ref[0], y_ref[1]                                  # [64, last] bf16
    f_re, f_im = fl_ref[0], fl_ref[1]
    z_re = _dot(y_re, f_re) - _dot(y_im, f_im)
    z_im = _dot(y_re, f_im) + _dot(y_im, f_re)
    p_re, p_im = _times(z_re, z_im, kh_ref)
    p_re, p_im = p_re.astype(jnp.bfloat16), p_im.astype(jnp.bfloat16)
    w_re = _dot(p_re, f_re) + _dot(p_im, f_im)                       # × conj(Fl)
    w_im = _dot(p_im, f_re) - _dot(p_re, f_im)
    _store(w_ref, *_times(w_re, w_im, tc_ref, conj=True))


def _pass_a_inverse_kernel(w_ref, g1_ref, y_ref):
    y = _dot(g1_ref[0], w_ref[0]) + _dot(g1_ref[1], w_ref[1])        # Re(conj(G) W) = G_re W_re + G_im W_im
    y_ref[...] = y.astype(y_ref.dtype)


def _cotangent_kernel(yu_ref, yd_ref, fl_ref, out_ref, *, batch, channels):
    """One (channel, block of 64 spectrum rows): Σ_b (Re, −Im) of (Yu_b @ Fl) ⊙ conj(Yd_b @ Fl)."""
    channel = pl.program_id(0)
    f_re, f_im = fl_ref[0], fl_ref[1]

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


# ----------------------------------------------------------------------------------------------
# Passes


def _triton(num_warps: int, interpret: bool):
    """Triton compiler parameters (pallas_call on a GPU otherwise lowers through Mosaic GPU)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _full(*shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _complex(rows, *shape):
    return jax.ShapeDtypeStruct((rows, 2, *shape), jnp.bfloat16)


def _pass_a(x, f: Factors, *, tile, options):
    """x: [rows, 64, M] bf16 -> Y1: [rows, re/im, 128, M] bf16."""
    rows, _, m = x.shape
    return pl.pallas_call(
        _pass_a_kernel, grid=(rows, m // tile),
        in_specs=[pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)), _full(2, R1, HALF),
                  pl.BlockSpec((2, R1, tile), lambda r, c: (0, 0, c))],
        out_specs=pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)),
        out_shape=_complex(rows, R1, m), **options,
    )(x, f.f1, f.t1)


def _pass_b(y, f: Factors, p: Plan, *, inverse, tile, options):
    """[rows, re/im, 128, r2, r3] -> the same, contracted along r2 (per k1 and block of n3 columns)."""
    rows = y.shape[0]
    tile = min(tile, p.r3)
    block = pl.BlockSpec((None, 2, None, p.r2, tile), lambda r, a, c: (r, 0, a, 0, c))
    if inverse:  # conj(T1)[k1] as [r2, r3]
        twiddle, twiddle_spec = f.t1.reshape(2, R1, p.r2, p.r3), pl.BlockSpec((2, None, p.r2, tile),
                                                                             lambda r, a, c: (0, a, 0, c))
    else:
        twiddle, twiddle_spec = f.t2, pl.BlockSpec((2, p.r2, tile), lambda r, a, c: (0, 0, c))
    return pl.pallas_call(
        functools.partial(_pass_b_kernel, inverse=inverse), grid=(rows, R1, p.r3 // tile),
        in_specs=[block, _full(2, p.r2, p.r2), twiddle_spec], out_specs=block,
        out_shape=_complex(rows, R1, p.r2, p.r3), **options,
    )(y, f.f2, twiddle)


def _pass_c(y, f: Factors, p: Plan, khat, *, channels, options):
    """[rows, re/im, spectrum_rows, last] -> the same: × Fl, × K̂, × conj(Fl), × conj(Tc)."""
    rows = y.shape[0]
    block = pl.BlockSpec((None, 2, ROWS, p.last), lambda r, i: (r, 0, i, 0))
    return pl.pallas_call(
        _pass_c_kernel, grid=(rows, p.spectrum_rows // ROWS),
        in_specs=[block, _full(2, p.last, p.last),
                  pl.BlockSpec((None, 2, ROWS, p.last), lambda r, i: (r % channels, 0, i, 0)),
                  pl.BlockSpec((2, ROWS, p.last), lambda r, i: (0, i, 0))],
        out_specs=block, out_shape=_complex(rows, p.spectrum_rows, p.last), **options,
    )(y, f.fl, khat, f.tc)


def _pass_a_inverse(w, f: Factors, dtype, *, tile, options):
    rows, _, _, m = w.shape
    return pl.pallas_call(
        _pass_a_inverse_kernel, grid=(rows, m // tile),
        in_specs=[pl.BlockSpec((None, 2, R1, tile), lambda r, c: (r, 0, 0, c)), _full(2, HALF, R1)],
        out_specs=pl.BlockSpec((None, HALF, tile), lambda r, c: (r, 0, c)),
        out_shape=jax.ShapeDtypeStruct((rows, HALF, m), dtype), **options,
    )(w, f.g1)


def _cotangent(yu, yd, f: Factors, p: Plan, *, channels, options):
    """Pass-C-ordered inputs of u and dy: [rows, re/im, spectrum_rows, last] -> K̂'s cotangent, float32."""
    rows = yu.shape[0]
    kernel = functools.partial(_cotangent_kernel, batch=rows // channels, channels=channels)
    rows_spec = pl.BlockSpec((rows, 2, ROWS, p.last), lambda h, i: (0, 0, i, 0))
    return pl.pallas_call(
        kernel, grid=(channels, p.spectrum_rows // ROWS),
        in_specs=[rows_spec, rows_spec, _full(2, p.last, p.last)],
        out_specs=pl.BlockSpec((None, 2, ROWS, p.last), lambda h, i: (h, 0, i, 0)),
        out_shape=jax.ShapeDtypeStruct((channels, 2, p.spectrum_rows, p.last), jnp.float32), **options,
    )(yu, yd, f.fl)


@functools.partial(jax.jit, static_argnames=("channels", "tile", "num_warps", "interpret"))
def long_conv_passes(u, khat, *, channels: int, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """y[r] = causal conv of u[r] with channel (r mod channels)'s kernel. u: [rows, n] bf16; khat:
    `kernel_spectrum(k, plan(n))`. Differentiable in u and khat (see the module docstring)."""
    rows, n = u.shape
    p = plan(n)
    m = p.length // R1
    f = factors(p)
    options = dict(interpret=interpret, compiler_params=_triton(num_warps, interpret))
    tile_a = min(tile, m)

    def to_c(x):
        """u-like rows -> pass C's input: A (and B)."""
        y = _pass_a(x.reshape(rows, HALF, m), f, tile=tile_a, options=options)
        if p.r3 > 1:
            y = _pass_b(y.reshape(rows, 2, R1, p.r2, p.r3), f, p, inverse=False, tile=tile, options=options)
        return y.reshape(rows, 2, p.spectrum_rows, p.last)

    def forward(x, khat):
        w = _pass_c(to_c(x), f, p, khat, channels=channels, options=options)
        if p.r3 > 1:
            w = _pass_b(w.reshape(rows, 2, R1, p.r2, p.r3), f, p, inverse=True, tile=tile, options=options)
        return _pass_a_inverse(w.reshape(rows, 2, R1, m), f, x.dtype, tile=tile_a, options=options).reshape(rows, n)

    @jax.custom_vjp
    def conv(u, khat):
        return forward(u, khat)

    def conv_fwd(u, khat):
        return forward(u, khat), (u, khat)

    def conv_bwd(residuals, dy):
        u, khat = residuals
        dy = dy.astype(u.dtype)
        du = forward(dy, khat.at[:, 1].multiply(-1.0))
        return du, _cotangent(to_c(u), to_c(dy), f, p, channels=channels, options=options)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(u, khat)


def long_conv_bhn(u, k, *, tile: int = 64, num_warps: int = 4, interpret: bool = False):
    """u: [B, H, N] bf16, k: [H, kernel_len <= N] -> y: [B, H, N] bf16; differentiable in u and k."""
    batch, channels, n = u.shape
    khat = kernel_spectrum(k, plan(n))
    y = long_conv_passes(u.reshape(batch * channels, n), khat, channels=channels, tile=tile, num_warps=num_warps,
                         interpret=interpret)
    return y.reshape(batch, channels, n)


def _numpy_model(n: int) -> float:
    """The passes in float64 against np.convolve (NumPy's FFT past 16K): the largest error over the largest output."""
    p = plan(n)
    rng = np.random.default_rng(0)
    u, k = rng.standard_normal(n), rng.standard_normal(n - 7)
    exact = factors(p, matrix_dtype=np.float64, table_dtype=np.float64)
    f = {name: a[0] + 1j * a[1] for name, a in exact._asdict().items()}
    khat = np.fft.fft(k, p.length) / p.length
    m = p.length // R1
    y = (f["f1"] @ u.reshape(HALF, m)) * f["t1"]                                        # A
    if p.r3 > 1:
        y = np.einsum("kn,anc->akc", f["f2"], y.reshape(R1, p.r2, p.r3)) * f["t2"]      # B
        khat = khat.reshape(p.r3, p.r2, R1).transpose(2, 1, 0)
    else:
        khat = khat.reshape(p.r2, R1).T
    y = y.reshape(p.spectrum_rows, p.last)
    w = ((y @ f["fl"]) * khat.reshape(p.spectrum_rows, p.last)) @ np.conj(f["fl"]) * np.conj(f["tc"])  # C
    if p.r3 > 1:
        w = np.einsum("nk,akc->anc", np.conj(f["f2"]), w.reshape(R1, p.r2, p.r3))       # B'
        w = w.reshape(R1, m) * np.conj(f["t1"])
    out = np.real(np.conj(f["g1"]) @ w.reshape(R1, m)).reshape(-1)                       # A'
    if n <= 16384:
        expected = np.convolve(u, k)[:n]
    else:  # np.convolve is O(n²); NumPy's own float64 FFT is the other way to the same numbers
        expected = np.fft.irfft(np.fft.rfft(u, p.length) * np.fft.rfft(k, p.length), p.length)[:n]
    return float(np.abs(out - expected).max() / np.abs(expected).max())
