"""Long convolution with the DFT written as a product of small dense matrices (Monarch / mixed-radix
Cooley–Tukey), so the work runs as matmuls on matrix units instead of an FFT library.

Shapes as in `longseq.ops.long_conv`: u [batch, seq, channels], k [channels, kernel_len], y like u.

The convolution theorem on a padded length L (a power of two):

    causal:    L >= seq + kernel_len − 1, so the circular convolution of the zero-padded signals
               has no wrap-around and its first `seq` outputs are the linear convolution.
    circular:  L = seq when seq is a power of two; otherwise L >= 2·seq − 1 with k padded to seq,
               and the linear result z is folded back: y[t] = z[t] + z[t + seq].

The DFT of length L = L1 · M (M = L2 · L3 · …) as matrices (decimation in time), on x viewed as
[L1, M] (x[M·n1 + m]):

    A  = F_L1 @ X                       contract n1: a dense [L1, L1] DFT matrix
    A' = A ⊙ T,  T[k1, m] = ω_L^(k1·m)  twiddles
    X̂[k1, :] = DFT_M(A'[k1, :])         the same, recursively, along m

X̂ comes out in a permuted order ([k1, permuted k']): the pointwise product with the kernel's
spectrum (computed by the same transform, hence in the same order) does not care, and the inverse
undoes the permutation. The inverse runs the steps backwards with conj(F)/L_i and conj(T).
A real input needs half the matmuls of the first step, zero-padded rows of X need none (the
matrices' columns for them are dropped), and the inverse computes only the rows it returns.

`Butterfly` holds one transform's matrices and twiddles; `dft_butterflies(plan)` gives the exact
DFT and its inverse. The learned butterfly of the long-conv layer (`learned_butterfly: true`) makes
both parameters, initialised there: y = inverse(forward(u) ⊙ forward(k)).

Complex numbers are (real, imaginary) pairs of real arrays so that matmul operands can be bf16 with
float32 accumulation (`operand_dtype`); float32 operands use full float32 precision.

This file holds the plan, the factors and the plain-JAX (XLA einsum) implementation, which is also
the reference of the fused Pallas kernel in `long_conv_monarch_pallas.py`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_FACTOR_LOG2 = 7  # factors of at most 128: 2 factors up to L = 2^14, 3 up to 2^21 (N = 1M causal)


class MonarchPlan(NamedTuple):
    """How a convolution of `seq` with a kernel of `kernel_len` is transformed.

    length: the transform length L (a power of two); factors: L = Π factors, largest first;
    kernel_len: the kernel length the transform sees (seq for a folded circular convolution);
    out_len: rows of the inverse transform that are needed; fold: add z[t + seq] to z[t].
    """

    seq: int
    kernel_len: int
    length: int
    factors: tuple[int, ...]
    out_len: int
    fold: bool


def split_factors(length: int) -> tuple[int, ...]:
    """A power of two as ceil(log2 / 7) near-equal power-of-two factors, largest first."""
    if length < 1 or length & (length - 1):
        raise ValueError(f"length: expected a power of two, got {length}")
    log2 = length.bit_length() - 1
    count = max(1, math.ceil(log2 / MAX_FACTOR_LOG2))
    logs = [log2 // count + (i < log2 % count) for i in range(count)]
    return tuple(1 << x for x in logs)


def monarch_plan(seq: int, kernel_len: int, *, causal: bool) -> MonarchPlan:
    """The transform length and factors for a convolution (see the module docstring)."""
    if not 1 <= kernel_len <= seq:
        raise ValueError(f"kernel_len: expected 1 <= kernel_len <= seq={seq}, got {kernel_len}")
    if causal:
        length = 1 << (seq + kernel_len - 2).bit_length()  # next power of two >= seq + kernel_len − 1
        return MonarchPlan(seq, kernel_len, length, split_factors(length), seq, False)
    if seq & (seq - 1) == 0:
        return MonarchPlan(seq, kernel_len, seq, split_factors(seq), seq, False)
    length = 1 << (2 * seq - 2).bit_length()
    return MonarchPlan(seq, seq, length, split_factors(length), 2 * seq - 1, True)


# ----------------------------------------------------------------------------------------------
# Factors


class Butterfly(NamedTuple):
    """One transform's factors, each a (real, imaginary) pair stacked on a leading axis of 2.

    matrices[i]: [2, L_i, L_i], applied as out[k] = Σ_n matrices[i][k, n] · in[n];
    twiddles[i]: [2, L_i, M_i] (M_i = Π_{j>i} L_j), for every factor but the last.
    """

    matrices: tuple[Array, ...]
    twiddles: tuple[Array, ...]


def _pair(z: np.ndarray) -> Array:
    return jnp.asarray(np.stack([z.real, z.imag]), jnp.float32)


def dft_butterflies(factors: tuple[int, ...]) -> tuple[Butterfly, Butterfly]:
    """(forward, inverse) factors of the exact DFT of length Π factors and its inverse (1/L included)."""
    matrices, inverse_matrices, twiddles, inverse_twiddles = [], [], [], []
    for i, size in enumerate(factors):
        rest = math.prod(factors[i + 1:])
        index = np.arange(size)
        dft = np.exp(-2j * np.pi * np.outer(index, index) / size)
        matrices.append(_pair(dft))
        inverse_matrices.append(_pair(np.conj(dft) / size))
        if i + 1 < len(factors):
            twiddle = np.exp(-2j * np.pi * np.outer(index, np.arange(rest)) / (size * rest))
            twiddles.append(_pair(twiddle))
            inverse_twiddles.append(_pair(np.conj(twiddle)))
    return (Butterfly(tuple(matrices), tuple(twiddles)),
            Butterfly(tuple(inverse_matrices), tuple(inverse_twiddles)))


# ----------------------------------------------------------------------------------------------
# Transforms on [batch, L, rest] (the transform runs along axis 1); complex = (re, im) pairs


def _matmul(spec: str, matrix: Array, x: Array, operand_dtype) -> Array:
    precision = jax.lax.Precision.HIGHEST if operand_dtype == jnp.float32 else None
    return jnp.einsum(spec, matrix.astype(operand_dtype), x.astype(operand_dtype), precision=precision,
                      preferred_element_type=jnp.float32)


def _complex_matmul(spec, matrix, re, im, operand_dtype):
    """(matrix_re + i·matrix_im) applied to (re + i·im); im None = a real input."""
    m_re, m_im = matrix[0], matrix[1]
    out_re = _matmul(spec, m_re, re, operand_dtype)
    out_im = _matmul(spec, m_im, re, operand_dtype)
    if im is not None:
        out_re = out_re - _matmul(spec, m_im, im, operand_dtype)
        out_im = out_im + _matmul(spec, m_re, im, operand_dtype)
    return out_re, out_im


def transform(butterfly: Butterfly, x: Array, *, operand_dtype=jnp.float32) -> tuple[Array, Array]:
    """Forward transform of the real x: [batch, rows, rest] zero-padded to L = Π factors along axis 1
    (rows <= L). Returns (re, im), each [batch, L, rest] float32, in the permuted spectrum order."""
    return _forward(butterfly.matrices, butterfly.twiddles, x.astype(jnp.float32), None, operand_dtype)


def _forward(matrices, twiddles, re, im, operand_dtype):
    size = matrices[0].shape[-1]
    rest = math.prod(m.shape[-1] for m in matrices[1:])
    batch, rows, tail = re.shape
    used = -(-rows // rest)  # rows of the [L1, M] view that are not all zero padding
    pad = ((0, 0), (0, used * rest - rows), (0, 0))
    re = jnp.pad(re, pad).reshape(batch, used, rest, tail)
    im = None if im is None else jnp.pad(im, pad).reshape(batch, used, rest, tail)
    re, im = _complex_matmul("kn,bnmr->bkmr", matrices[0][:, :, :used], re, im, operand_dtype)
    if len(matrices) == 1:
        return re.reshape(batch, size, tail), im.reshape(batch, size, tail)
    t_re, t_im = twiddles[0][0][None, :, :, None], twiddles[0][1][None, :, :, None]
    re, im = re * t_re - im * t_im, re * t_im + im * t_re
    re, im = _forward(matrices[1:], twiddles[1:], re.reshape(batch * size, rest, tail),
                      im.reshape(batch * size, rest, tail), operand_dtype)
    return re.reshape(batch, size * rest, tail), im.reshape(batch, size * rest, tail)


def inverse_transform(butterfly: Butterfly, re: Array, im: Array, *, out_len: int,
                      operand_dtype=jnp.float32) -> Array:
    """The real part of the inverse transform's first out_len rows: re, im [batch, L, rest] in the
    permuted order -> [batch, out_len, rest] float32."""
    return _inverse(butterfly.matrices, butterfly.twiddles, re, im, out_len, operand_dtype, real=True)[0]


def _inverse(matrices, twiddles, re, im, out_len, operand_dtype, *, real):
    size = matrices[0].shape[-1]
    rest = math.prod(m.shape[-1] for m in matrices[1:])
    batch, _, tail = re.shape
    if len(matrices) > 1:
        re, im = _inverse(matrices[1:], twiddles[1:], re.reshape(batch * size, rest, tail),
                          im.reshape(batch * size, rest, tail), rest, operand_dtype, real=False)
        re, im = re.reshape(batch, size, rest, tail), im.reshape(batch, size, rest, tail)
        t_re, t_im = twiddles[0][0][None, :, :, None], twiddles[0][1][None, :, :, None]
        re, im = re * t_re - im * t_im, re * t_im + im * t_re
    else:
        re, im = re.reshape(batch, size, 1, tail), im.reshape(batch, size, 1, tail)
    used = -(-out_len // rest)  # output rows of the [L1, M] view that are needed
    matrix = matrices[0][:, :used]
    if real:  # Re((G_re + i·G_im)(re + i·im)) = G_re·re − G_im·im
        out_re = _matmul("nk,bkmr->bnmr", matrix[0], re, operand_dtype) - \
            _matmul("nk,bkmr->bnmr", matrix[1], im, operand_dtype)
        out_im = None
    else:
        out_re, out_im = _complex_matmul("nk,bkmr->bnmr", matrix, re, im, operand_dtype)
    out_re = out_re.reshape(batch, used * rest, tail)[:, :out_len]
    out_im = None if out_im is None else out_im.reshape(batch, used * rest, tail)[:, :out_len]
    return out_re, out_im


# ----------------------------------------------------------------------------------------------
# The convolution


def operand_dtype_for(dtype) -> jnp.dtype:
    """Matmul operands: bf16/fp16 inputs keep their dtype (float32 accumulation), else float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def real_signal_dft(k: Array, length: int) -> Array:
    """k: [channels, kernel_len <= length] real -> its DFT at `length` (even) points as (re, im) planes:
    [channels, 2, length] float32.

    What the fused kernels need of the kernel k (`kernel_spectrum` in the Hopper and passes modules): jnp.fft.rfft,
    half the work of jnp.fft.fft on a real row, and the other half by symmetry, X[length − f] = conj(X[f]).
    k's cotangent goes through rfft's transpose, again half of fft's. Planes rather than complex numbers: the
    callers' layout transposes then read them in one fusion (20% faster forward + backward than splitting a
    complex64 spectrum afterwards, at 1024 × 64K on an H200)."""
    half = jnp.fft.rfft(k.astype(jnp.float32), length, axis=-1)  # bins 0 … length / 2
    mirror = half[:, -2:0:-1]
    return jnp.stack([jnp.concatenate([half.real, mirror.real], -1),
                      jnp.concatenate([half.imag, -mirror.imag], -1)], 1)


def kernel_spectrum(k: Array, plan: MonarchPlan, forward: Butterfly, *, operand_dtype=jnp.float32):
    """The transform of k: [channels, kernel_len] -> (re, im), each [L, channels] float32. Computed
    once per call, not per batch element."""
    re, im = transform(forward, k.T[None], operand_dtype=operand_dtype)
    return re[0], im[0]


def fold(z: Array, plan: MonarchPlan) -> Array:
    """Rows of the linear convolution z [batch, out_len, rest] -> [batch, seq, rest]: circular wrap."""
    if not plan.fold:
        return z
    seq = plan.seq
    return z[:, :seq] + jnp.pad(z[:, seq:], ((0, 0), (0, 1), (0, 0)))


def long_conv_monarch_xla(u: Array, k: Array, *, causal: bool,
                          butterflies: tuple[Butterfly, Butterfly] | None = None) -> Array:
    """`long_conv` by Monarch matmuls as separate XLA ops (arguments already validated).

    butterflies: (forward, inverse) factors (None = the exact DFT of the plan's length), e.g. a
    learned butterfly's parameters; causal only, their length L = Π factors must be at least
    seq + kernel_len − 1 (a layer's factors for its longest sequence serve shorter ones too).
    """
    seq, kernel_len = u.shape[1], k.shape[1]
    if butterflies is None:
        plan = monarch_plan(seq, kernel_len, causal=causal)
        forward, inverse = dft_butterflies(plan.factors)
    else:
        forward, inverse = butterflies
        factors = tuple(m.shape[-1] for m in forward.matrices)
        length = math.prod(factors)
        if not causal or length < seq + kernel_len - 1:
            raise ValueError(f"butterflies: length {length} needs causal=True and >= seq + kernel_len − 1 = "
                             f"{seq + kernel_len - 1}")
        plan = MonarchPlan(seq, kernel_len, length, factors, seq, False)
    operands = operand_dtype_for(u.dtype)
    k = jnp.pad(k, ((0, 0), (0, plan.kernel_len - k.shape[1])))
    k_re, k_im = kernel_spectrum(k, plan, forward, operand_dtype=operands)
    u_re, u_im = transform(forward, u, operand_dtype=operands)
    y_re = u_re * k_re - u_im * k_im
    y_im = u_re * k_im + u_im * k_re
    z = inverse_transform(inverse, y_re, y_im, out_len=plan.out_len, operand_dtype=operands)
    return fold(z, plan).astype(u.dtype)
