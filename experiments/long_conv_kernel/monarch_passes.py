"""Prototype (issue #5): the causal Monarch long convolution as portable Pallas passes through HBM.

NOTES.md ("Past N = 4K") has the reasoning. Each pass is a tiled GEMM with its complex epilogue fused, so no
pass waits on another's phases the way the single Hopper kernel's chain does
(`longseq/ops/long_conv_monarch_hopper.py`). The intermediates are complex bf16 in HBM. Three passes at every
N (1K … 1M), forward and backward.

L = 2N = 128 · M. Two factors (M = r2 <= 128, N <= 8K), or three (M = r2 · r3, r2, r3 >= 16, N = 16K … 1M).
x is viewed as X[n1, n2, n3] (n = n1·M + n2·r3 + n3; rows n1 >= 64 are the causal zero padding), the spectrum
comes out as Z[k1, k2, k3] = DFT_L(x)[k1 + 128·k2 + 128·r2·k3], and K̂ is laid out the same way (1/L folded in).
A row's intermediates are stored as [re/im, outer, 128, inner] = [2, n2, k1, n3] (three factors) or
[2, 1, k1, n2] (two: outer = 1, inner = r2), so the middle pass reads whole k1 slabs:

    A    Y1 = (F1[:, :64] @ X) ⊙ T1                T1[k1, m] = ω_L^(k1·m), m = n2·r3 + n3
    C    per k1 (a group of G k1 slabs per program):
           Y2 = (F2 @ Y1[:, k1, :]) ⊙ T2             T2[k2, n3] = ω_M^(k2·n3)                 (three factors)
           W2 = ((Y2 @ Fl) ⊙ K̂) @ conj(Fl)           Fl: the last factor (r3, or r2 with two factors)
           W1 = (conj(F2) @ (W2 ⊙ conj(T2))) ⊙ conj(T1)   (with two factors: W1 = W2 ⊙ conj(T1))
    A'   y  = Re(conj(F1)[:64, :] @ W1)

T1 is never stored whole: T1[k1, n2·r3 + n3] = ω_L^(k1·r3·n2) · ω_L^(k1·n3) is formed in registers from two
small float32 tables (pass A: ω_L^(k1·c·tile) · ω_L^(k1·j) for column block c). T2 is one [r2, r3] table.

Pairs (`pair=True`, even batch): the rows of batch b and b + B/2 (same channel) go through as one complex row
u_b + i·u_{b+B/2}; A takes the complex input, A' returns the real and imaginary parts as the two outputs. The
maps are complex-linear and K̂ is the spectrum of a real kernel, so this is exact, and it halves the
intermediates. Batch loop (`batch_loop=True`): one program of C takes (channel, k1 group) and loops over the
batch, so K̂ is read once per channel.

HBM bytes per row of N (u, y: 2N each; an intermediate: 8N, or 4N per row for a pair; K̂ in bf16: 8N per
channel), `traffic()`:
    forward   A 2N + 8N/P | C 16N/P + 8N/B | A' 8N/P + 2N         = 4N + 32N/P + 8N/B  (P = 2: 20N; 1: 36N)
    backward  A on dy and u 2 × (2N + 8N/P) | C (du and K̂'s cotangent, fused) 24N/P + 24N/B | A' 8N/P + 2N
The old five-pass version moved 68N (three factors) or 36N, plus K̂ in float32 per row (16N) and the twiddle
tables per program. The backward: du by the same passes with conj(K̂); K̂'s cotangent Σ_b (Re, −Im) Û_b ⊙
conj(D̂_b) from A and the first half of C on u and dy, reduced over the batch inside C. With pairs the sum
gains i·(Û_b' conj(D̂_b) − Û_b conj(D̂_b')), i times a Hermitian spectrum, which adds nothing to a real
kernel's gradient: K̂'s cotangent is right after projection onto spectra of real kernels, which
`kernel_spectrum`'s VJP does (so `long_conv_passes` wants the K̂ of a real kernel). `interpret=True` runs it
on CPU. Checked in float64 by `_numpy_model`. What the options do: `long_conv_passes`; timed by bench_passes.py.
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


class Plan(NamedTuple):
    n: int
    length: int
    r2: int
    r3: int  # 1: two factors

    @property
    def m(self) -> int:
        return self.length // R1

    @property
    def outer(self) -> int:
        """The n2 (k2) axis of a row's layout [2, outer, 128, inner]: r2 with three factors, 1 with two."""
        return self.r2 if self.r3 > 1 else 1

    @property
    def inner(self) -> int:
        """The n3 (k3) axis, which pass C contracts last: r3 with three factors, r2 with two."""
        return self.r3 if self.r3 > 1 else self.r2


def plan(n: int) -> Plan:
    """The factors for N = n (a power of two, 1024 … 2^20). r3 (the inner axis) takes the larger share."""
    if n < 1024 or n > 1 << 20 or n & (n - 1):
        raise ValueError(f"u: N = {n}: the prototype takes powers of two from 1024 to 1048576")
    length = 2 * n
    m = length // R1
    if m <= 128:
        return Plan(n, length, m, 1)
    r3 = min(128, m // 16)
    return Plan(n, length, m // r3, r3)


def _planes(z: np.ndarray, dtype) -> np.ndarray:
    """A complex array as its [re, im] planes (NumPy: constants, never tracers the custom_vjp could close over)."""
    return np.stack([z.real, z.imag]).astype(dtype)


def _dft(r: int) -> np.ndarray:
    return np.exp(-2j * np.pi * np.outer(np.arange(r), np.arange(r)) / r)


def _omega(exponent: np.ndarray, period: int) -> np.ndarray:
    return np.exp(-2j * np.pi * (exponent % period) / period)


class Factors(NamedTuple):
    fa: np.ndarray   # [2 (out re/im), 2 (in re/im), 128, 64] bf16: F1[:, :64] as a real block matrix (pass A)
    ga: np.ndarray   # [2 (out re/im), 2 (in re/im), 64, 128] bf16: conj(F1)[:64, :] likewise (pass A')
    ta: np.ndarray   # [2, M / tile, 128] f32: ω_L^(k1·c·tile), column block c of pass A
    tb: np.ndarray   # [2, 128, tile] f32: ω_L^(k1·j)                   (T1 = ta[c] ⊗ tb in pass A)
    ca: np.ndarray   # [2, outer, 128] f32: ω_L^(k1·r3·n2) (ones with two factors)
    cb: np.ndarray   # [2, 128, inner] f32: ω_L^(k1·n3)               (T1 = ca ⊗ cb in pass C)
    f2: np.ndarray   # [2, r2, r2] bf16 (three factors)
    t2: np.ndarray   # [2, r2, r3] table_dtype (three factors)
    fl: np.ndarray   # [2, inner, inner] bf16: the last factor


def factors(p: Plan, tile: int = 64, matrix_dtype=jnp.bfloat16, table_dtype=jnp.bfloat16,
            twiddle_dtype=np.float32) -> Factors:
    f1 = _dft(R1)[:, :HALF]
    g1 = np.conj(_dft(R1)[:HALF, :])
    fa = np.stack([np.stack([f1.real, -f1.imag]), np.stack([f1.imag, f1.real])])   # (re, im) of F1 (x_a + i x_b)
    ga = np.stack([np.stack([g1.real, -g1.imag]), np.stack([g1.imag, g1.real])])   # (re, im) of conj(G) W
    k1 = np.arange(R1)
    ta = _omega(np.outer(np.arange(p.m // tile) * tile, k1), p.length)
    tb = _omega(np.outer(k1, np.arange(tile)), p.length)
    ca = _omega(np.outer(np.arange(p.outer) * p.inner, k1), p.length)
    cb = _omega(np.outer(k1, np.arange(p.inner)), p.length)
    if p.r3 == 1:
        f2 = t2 = np.zeros((1, 1))
    else:
        f2, t2 = _dft(p.r2), _omega(np.outer(np.arange(p.r2), np.arange(p.r3)), p.m)
    tw = twiddle_dtype
    return Factors(fa.astype(matrix_dtype), ga.astype(matrix_dtype), _planes(ta, tw), _planes(tb, tw),
                   _planes(ca, tw), _planes(cb, tw), _planes(f2, matrix_dtype), _planes(t2, table_dtype),
                   _planes(_dft(p.inner), matrix_dtype))


def kernel_spectrum(k: jax.Array, p: Plan, dtype=jnp.float32) -> jax.Array:
    """k: [channels, kernel_len <= N] -> K̂: [channels, re/im, outer, 128, inner] (dtype), pass C's order, / L."""
    channels = k.shape[0]
    spectrum = jnp.fft.fft(k.astype(jnp.float32), p.length, axis=-1) / p.length
    # k = k1 + 128·k2 (+ 128·r2·k3) -> [k2, k1, k3] (three factors) or [1, k1, k2] (two)
    spectrum = spectrum.reshape(channels, p.m // p.outer, p.outer, R1).transpose(0, 2, 3, 1)
    return jnp.stack([spectrum.real, spectrum.imag], 1).astype(dtype)


def traffic(n: int, batch: int, *, pair: bool = True, khat_bytes: int = 2, fuse_backward: bool = True) -> dict:
    """Model HBM bytes per row (one of batch · channels) of each pass, forward and backward: the bytes each
    pass must read and write once, with K̂ (and its cotangent, float32) counted once per channel."""
    p = 2 if pair and batch % 2 == 0 else 1
    spectrum = 8 * n / p                    # one intermediate: 2N complex bf16 values, shared by a pair's rows
    khat = 2 * 2 * n * khat_bytes / batch   # [re/im, 2N] per channel
    cotangent = 2 * 2 * n * 4 / batch
    fwd = {"A": 2 * n + spectrum, "C": 2 * spectrum + khat, "A'": spectrum + 2 * n}
    bwd = {"A(dy), A(u)": 2 * (2 * n + spectrum), "A'": spectrum + 2 * n}
    if fuse_backward:
        bwd["C (du, dK̂)"] = 3 * spectrum + khat + cotangent
    else:
        bwd["C (du)"], bwd["C (dK̂)"] = 2 * spectrum + khat, 2 * spectrum + cotangent
    return {"fwd": fwd, "bwd": bwd}


# ----------------------------------------------------------------------------------------------
# Kernels (complex values as (re, im) pairs of planes)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _mul(a, b, conj=False):
    """a · b, or a · conj(b)."""
    (ar, ai), (br, bi) = a, b
    if conj:
        return ar * br + ai * bi, ai * br - ar * bi
    return ar * br - ai * bi, ar * bi + ai * br


def _bf16(z):
    return z[0].astype(jnp.bfloat16), z[1].astype(jnp.bfloat16)


def _f32(z):
    return z[0].astype(jnp.float32), z[1].astype(jnp.float32)


def _right(a, f, conj=False):
    """a @ F (or a @ conj(F)): sums of dots (Triton chains dot + dot into one accumulator), no differences."""
    (ar, ai), (fr, fi) = a, f
    if conj:
        return _dot(ar, fr) + _dot(ai, fi), _dot(ai, fr) + _dot(ar, -fi)
    return _dot(ar, fr) + _dot(ai, -fi), _dot(ar, fi) + _dot(ai, fr)


def _left(f, a, conj=False):
    """F @ a (or conj(F) @ a)."""
    (ar, ai), (fr, fi) = a, f
    if conj:
        return _dot(fr, ar) + _dot(fi, ai), _dot(fr, ai) + _dot(-fi, ar)
    return _dot(fr, ar) + _dot(-fi, ai), _dot(fr, ai) + _dot(fi, ar)


def _invariant(make, hoist):
    """A loop-invariant value: made once before the loop (hoist: it stays in registers), or at each use."""
    if hoist:
        value = make()
        return lambda: value
    return make


def _planes_of(ref):
    return lambda: (ref[0], ref[1])


def _pass_a_kernel(x_ref, f_ref, ta_ref, tb_ref, y_ref, *, pairs, steps, hoist):
    """x_ref: [P, R, 64, tile] u-like rows (P = 2: a pair's real and imaginary parts), f_ref: [2, P, 128, 64],
    ta_ref: [2, 128], tb_ref: [2, 128, tile] -> y_ref: [R, 2, 128, tile] = (F1 @ x) ⊙ (ta ⊗ tb), row by row."""
    f = _invariant(lambda: [(f_ref[0, q], f_ref[1, q]) for q in range(pairs)], hoist)
    t = _invariant(lambda: _mul((ta_ref[0][:, None], ta_ref[1][:, None]), (tb_ref[0], tb_ref[1])), hoist)

    def row(i, carry):
        matrices = f()
        x = x_ref[0, i]
        re, im = _dot(matrices[0][0], x), _dot(matrices[0][1], x)
        if pairs == 2:
            x = x_ref[1, i]
            re, im = re + _dot(matrices[1][0], x), im + _dot(matrices[1][1], x)
        re, im = _mul((re, im), t())
        y_ref[i, 0] = re.astype(y_ref.dtype)
        y_ref[i, 1] = im.astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, steps, row, 0)


def _pass_a_inverse_kernel(w_ref, g_ref, y_ref, *, pairs, steps, hoist):
    """w_ref: [R, 2, 128, tile], g_ref: [P, 2, 64, 128] -> y_ref: [P, R, 64, tile]: Re (and Im) of conj(G) @ w."""
    g = _invariant(lambda: [(g_ref[q, 0], g_ref[q, 1]) for q in range(pairs)], hoist)

    def row(i, carry):
        w_re, w_im = w_ref[i, 0], w_ref[i, 1]
        for q, (g_re, g_im) in enumerate(g()):
            y_ref[q, i] = (_dot(g_re, w_re) + _dot(g_im, w_im)).astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, steps, row, 0)


class _Slab(NamedTuple):
    """Pass C's block of one row: G k1 slabs of [outer, inner], held as [outer, G, inner] (three factors, G > 1),
    [outer, inner] (G = 1) or [G, inner] (two factors). Left multiplies see it as [outer, G·inner], right
    multiplies as [outer·G, inner]."""
    outer: int
    group: int
    inner: int

    @property
    def three(self) -> bool:
        return self.outer > 1

    @property
    def dims(self):
        """Block dims of the trailing [outer, 128, inner] axes (None: squeezed)."""
        return (self.outer if self.three else None, self.group if self.group > 1 else None, self.inner)

    def _as(self, z, shape):
        return tuple(x.reshape(shape) if x.shape != shape else x for x in z)

    def left(self, z):
        return self._as(z, (self.outer, self.group * self.inner))

    def right(self, z):
        return self._as(z, (self.outer * self.group, self.inner))

    def block(self, z):
        shape = tuple(d for d in self.dims if d is not None)
        return self._as(z, shape)

    def broadcast(self, z):
        """An [outer, inner] table over the G slabs, as [outer, G, inner]."""
        if self.group == 1:
            return z
        return tuple(jnp.broadcast_to(x[:, None, :], (self.outer, self.group, self.inner)) for x in z)


def _middle_kernel(*refs, slab: _Slab, steps, conj_khat, with_w, with_cotangent, hoist):
    """Pass C on a (batch block, channel, k1 group): for each of `steps` rows, y -> spectrum Z; with_w: × K̂
    (or conj(K̂)) and back, into w; with_cotangent: Σ (Re, −Im) Zu ⊙ conj(Z) over the rows of yu, into cot.

    refs: y [steps, 2, block], [yu [steps, 2, block]], [kh [2, block]], fl [2, inner, inner], cb [2, G|-, inner],
    [f2 [2, outer, outer], t2 [2, outer, inner], ca [2, outer, G|-]] (three factors), then the outputs
    [w [steps, 2, block]], [cot [2, block] f32]. `block` is slab.dims without the squeezed axes."""
    refs = list(refs)
    y_ref = refs.pop(0)
    yu_ref = refs.pop(0) if with_cotangent else None
    kh_ref = refs.pop(0) if with_w else None
    fl, cb_ref = _invariant(_planes_of(refs.pop(0)), hoist), refs.pop(0)
    if slab.three:
        f2, t2_ref, ca_ref = _invariant(_planes_of(refs.pop(0)), hoist), refs.pop(0), refs.pop(0)
        t2 = _invariant(lambda: _f32(slab.broadcast((t2_ref[0], t2_ref[1]))), hoist)   # [outer, G|-, inner]
    if with_w:
        kh = _invariant(lambda: slab.right((kh_ref[0], kh_ref[1])), hoist)
    w_ref = refs.pop(0) if with_w else None
    cot_ref = refs.pop(0) if with_cotangent else None

    def spectrum(ref, i):
        """Row i's Z, the right view (f32)."""
        z = ref[i, 0], ref[i, 1]
        if slab.three:
            z = _bf16(_mul(_left(f2(), slab.left(z)), slab.left(t2())))
        return _right(slab.right(z), fl())

    def make_t1():
        """T1 on the block, as stored."""
        b = cb_ref[0], cb_ref[1]
        if not slab.three:
            return b
        a = ca_ref[0], ca_ref[1]
        if slab.group == 1:
            return _mul((a[0][:, None], a[1][:, None]), (b[0][None, :], b[1][None, :]))
        return _mul((a[0][:, :, None], a[1][:, :, None]), (b[0][None], b[1][None]))

    t1 = _invariant(make_t1, hoist)

    def back(p):
        """P (bf16, right view) -> W1 (f32, as stored)."""
        w = _right(p, fl(), conj=True)
        if slab.three:
            w = _bf16(_mul(w, slab.right(t2()), conj=True))
            w = slab.block(_left(f2(), slab.left(w), conj=True))
        return _mul(w, t1(), conj=True)

    def row(i, acc):
        z = spectrum(y_ref, i)
        if with_cotangent:  # first, so that z is not held through `back`
            zu = spectrum(yu_ref, i)
            acc = acc[0] + zu[0] * z[0] + zu[1] * z[1], acc[1] + zu[0] * z[1] - zu[1] * z[0]
        if with_w:
            w = back(_bf16(_mul(z, _f32(kh()), conj=conj_khat)))
            w_ref[i, 0] = w[0].astype(w_ref.dtype)
            w_ref[i, 1] = w[1].astype(w_ref.dtype)
        return acc

    zero = jnp.zeros((slab.outer * slab.group, slab.inner), jnp.float32)
    acc = jax.lax.fori_loop(0, steps, row, (zero, zero) if with_cotangent else 0)
    if with_cotangent:
        acc = slab.block(acc)
        cot_ref[0] = acc[0]
        cot_ref[1] = acc[1]


# ----------------------------------------------------------------------------------------------
# Passes


def _params(num_warps: int, num_stages: int, interpret: bool):
    """Triton compiler parameters (pallas_call on a GPU otherwise lowers through Mosaic GPU)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _full(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _pow2_divisor(total: int, at_most: int) -> int:
    d = 1
    while d * 2 <= at_most and total % (d * 2) == 0:
        d *= 2
    return d


class _Config(NamedTuple):
    """Everything static about one call: the plan, the constants, and each pass's blocking."""
    p: Plan
    f: Factors
    pairs: int            # 2: rows b and b + B/2 as one complex row
    rows: int             # rows per pass (pairs count once)
    batch: int            # batch elements per pass (pairs count once)
    channels: int
    rows_per_program: int
    batch_block: int      # rows of one channel per program of pass C
    slab: _Slab           # pass C's forward block
    slab_bwd: _Slab       # pass C's backward block (half the values: it holds three spectra)
    hoist: bool
    khat_dtype: object
    options: tuple        # (num_warps, num_stages, interpret)

    def compiler(self, slab=None):
        warps, stages, interpret = self.options
        if slab is not None:  # pass C: a complex f32 block at most 64 registers a thread
            warps = max(warps, min(16, slab.outer * slab.group * slab.inner // 1024))
        return dict(interpret=interpret, compiler_params=_params(warps, stages, interpret))


def _configure(rows, n, channels, *, pair=True, batch_loop=True, khat_dtype=jnp.bfloat16,
               table_dtype=jnp.bfloat16, tile=64, rows_per_program=4, block=8192, num_warps=8, num_stages=None,
               hoist=False, interpret=False) -> _Config:
    p = plan(n)
    if num_stages is None:  # 2 stages overflow shared memory by 1 KB at N = 8K (r2 = 128) on an H200
        num_stages = 1 if p.r3 == 1 and p.r2 == 128 else 2
    batch = rows // channels
    pairs = 2 if pair and batch % 2 == 0 else 1
    tile = min(tile, p.inner)

    def slab(values):
        group = max(1, values // p.m) if p.r3 > 1 else max(16, values // p.inner)
        return _Slab(p.outer, _pow2_divisor(R1, group), p.inner)

    return _Config(p, factors(p, tile, table_dtype=table_dtype), pairs, rows // pairs, batch // pairs, channels,
                   _pow2_divisor(rows // pairs, rows_per_program), batch // pairs if batch_loop else 1,
                   slab(block), slab(block // 2), hoist, khat_dtype, (num_warps, num_stages, interpret))


def _pass_a(x, c: _Config):
    """x: [P, rows, 64, M] bf16 -> Y1: [rows, re/im, outer, 128, inner] bf16. Grid (row block, column block)."""
    p, f, step = c.p, c.f, c.rows_per_program
    tile = f.tb.shape[-1]
    per_n2 = p.inner // tile
    return pl.pallas_call(
        functools.partial(_pass_a_kernel, pairs=c.pairs, steps=step, hoist=c.hoist),
        grid=(c.rows // step, p.m // tile),
        in_specs=[pl.BlockSpec((c.pairs, step, HALF, tile), lambda r, j: (0, r, 0, j)),
                  pl.BlockSpec((2, c.pairs, R1, HALF), lambda r, j: (0, 0, 0, 0)),
                  pl.BlockSpec((2, None, R1), lambda r, j: (0, j, 0)), _full(f.tb)],
        out_specs=pl.BlockSpec((step, 2, None, R1, tile), lambda r, j: (r, 0, j // per_n2, 0, j % per_n2)),
        out_shape=jax.ShapeDtypeStruct((c.rows, 2, p.outer, R1, p.inner), jnp.bfloat16), **c.compiler(),
    )(x, f.fa[:, :c.pairs], f.ta, f.tb)


def _pass_a_inverse(w, c: _Config, dtype):
    """W1: [rows, re/im, outer, 128, inner] -> y: [P, rows, 64, M]."""
    p, f, step = c.p, c.f, c.rows_per_program
    tile = f.tb.shape[-1]
    per_n2 = p.inner // tile
    return pl.pallas_call(
        functools.partial(_pass_a_inverse_kernel, pairs=c.pairs, steps=step, hoist=c.hoist),
        grid=(c.rows // step, p.m // tile),
        in_specs=[pl.BlockSpec((step, 2, None, R1, tile), lambda r, j: (r, 0, j // per_n2, 0, j % per_n2)),
                  pl.BlockSpec((c.pairs, 2, HALF, R1), lambda r, j: (0, 0, 0, 0))],
        out_specs=pl.BlockSpec((c.pairs, step, HALF, tile), lambda r, j: (0, r, 0, j)),
        out_shape=jax.ShapeDtypeStruct((c.pairs, c.rows, HALF, p.m), dtype), **c.compiler(),
    )(w, f.ga[:c.pairs])


def _pass_c(ys, khat, c: _Config, slab: _Slab, *, conj_khat=False, with_w=True, with_cotangent=False):
    """ys: one or two (y, then yu) [rows, re/im, outer, 128, inner] -> [W1 like y] (with_w: y's spectrum × K̂ or
    conj(K̂), transformed back), [K̂'s cotangent summed over each program's batch block: [batch / batch_block,
    channels, re/im, outer, 128, inner] f32] (with_cotangent). Grid (batch block, channel, k1 group), the batch
    block fastest: consecutive programs share K̂'s block."""
    p, f = c.p, c.f
    shape = (c.batch, c.channels, 2, p.outer, R1, p.inner)
    ys = [y.reshape(shape) for y in ys]
    grid = (c.batch // c.batch_block, c.channels, R1 // slab.group)
    data = pl.BlockSpec((c.batch_block, None, 2, *slab.dims), lambda b, h, j: (b, h, 0, 0, j, 0))
    per_channel = pl.BlockSpec((None, 2, *slab.dims), lambda b, h, j: (h, 0, 0, j, 0))
    tables = [f.fl, f.cb]
    specs = [_full(f.fl), pl.BlockSpec((2, slab.dims[1], p.inner), lambda b, h, j: (0, j, 0))]
    if slab.three:
        tables += [f.f2, f.t2, f.ca]
        specs += [_full(f.f2), _full(f.t2), pl.BlockSpec((2, p.outer, slab.dims[1]), lambda b, h, j: (0, 0, j))]
    out_specs, out_shape = [], []
    if with_w:
        out_specs.append(data)
        out_shape.append(jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    if with_cotangent:
        out_specs.append(pl.BlockSpec((None, None, 2, *slab.dims), lambda b, h, j: (b, h, 0, 0, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((grid[0], *shape[1:]), jnp.float32))
    kernel = functools.partial(_middle_kernel, slab=slab, steps=c.batch_block, conj_khat=conj_khat, with_w=with_w,
                               with_cotangent=with_cotangent, hoist=c.hoist)
    outs = list(pl.pallas_call(
        kernel, grid=grid, in_specs=[data] * len(ys) + ([per_channel] if with_w else []) + specs,
        out_specs=out_specs, out_shape=out_shape, **c.compiler(slab),
    )(*ys, *([khat] if with_w else []), *tables))
    if with_w:
        outs[0] = outs[0].reshape(c.rows, 2, p.outer, R1, p.inner)
    return outs


def pass_functions(rows: int, n: int, channels: int, **options) -> dict:
    """The forward passes one at a time, for timing: {"A": u [rows, n] -> Y1, "C": (Y1, K̂ in khat_dtype) -> W1,
    "A'": W1 -> y [rows, n]}, with the options of `long_conv_passes` (fuse_backward aside)."""
    c = _configure(rows, n, channels, **options)
    return {"A": lambda u: _pass_a(u.reshape(c.pairs, c.rows, HALF, c.p.m), c),
            "C": lambda y, khat: _pass_c([y], khat, c, c.slab)[0],
            "A'": lambda w: _pass_a_inverse(w, c, jnp.bfloat16).reshape(rows, n)}


_STATIC = ("channels", "pair", "batch_loop", "khat_dtype", "table_dtype", "tile", "rows_per_program", "block",
           "num_warps", "num_stages", "hoist", "fuse_backward", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def long_conv_passes(u, khat, *, channels: int, pair: bool = True, batch_loop: bool = True,
                     khat_dtype=jnp.bfloat16, table_dtype=jnp.bfloat16, tile: int = 64, rows_per_program: int = 4,
                     block: int = 8192, num_warps: int = 8, num_stages: int | None = None, hoist: bool = False,
                     fuse_backward: bool = True, interpret: bool = False):
    """y[r] = causal conv of u[r] with channel (r mod channels)'s kernel. u: [rows, n] bf16, rows = batch ·
    channels; khat: `kernel_spectrum(k, plan(n))`. Differentiable in u and khat (see the module docstring).

    pair: two batch elements as one complex row (even batch). batch_loop: pass C loops over the batch per
    (channel, k1 group) (else one row per program, the batch fastest in the grid). khat_dtype: K̂ in HBM.
    table_dtype: T2. tile: the columns of A's and A''s blocks (at most inner). rows_per_program: rows A and A'
    loop over per program. block: about how many spectrum values of a row one program of C holds (G = block / M
    k1 slabs, at least 1; two factors: at least 16 rows k1); half that in the backward. num_warps: at least
    block / 1024 in C. num_stages: Triton's software pipelining of those loops (default 2; 1 at N = 8K, where
    2 overflow shared memory). hoist: make each program's matrices, twiddles and K̂ block once, before its
    loop, rather than at each use. fuse_backward: du and K̂'s cotangent in one pass C."""
    rows, n = u.shape
    c = _configure(rows, n, channels, pair=pair, batch_loop=batch_loop, khat_dtype=khat_dtype,
                   table_dtype=table_dtype, tile=tile, rows_per_program=rows_per_program, block=block,
                   num_warps=num_warps, num_stages=num_stages, hoist=hoist, interpret=interpret)
    khat_in = khat.dtype

    def spectra(x):
        return _pass_a(x.reshape(c.pairs, c.rows, HALF, c.p.m), c)

    def forward(x, kh):
        [w] = _pass_c([spectra(x)], kh, c, c.slab)
        return _pass_a_inverse(w, c, x.dtype).reshape(rows, n)

    @jax.custom_vjp
    def conv(u, khat):
        return forward(u, khat.astype(khat_dtype))

    def conv_fwd(u, khat):
        kh = khat.astype(khat_dtype)
        return forward(u, kh), (u, kh)

    def conv_bwd(residuals, dy):
        u, kh = residuals
        yd, yu = spectra(dy.astype(u.dtype)), spectra(u)
        if fuse_backward:
            wd, cot = _pass_c([yd, yu], kh, c, c.slab_bwd, conj_khat=True, with_cotangent=True)
        else:
            [wd] = _pass_c([yd], kh, c, c.slab, conj_khat=True)
            [cot] = _pass_c([yd, yu], None, c, c.slab_bwd, with_w=False, with_cotangent=True)
        return _pass_a_inverse(wd, c, u.dtype).reshape(rows, n), cot.sum(0).astype(khat_in)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(u, khat)


def long_conv_bhn(u, k, **options):
    """u: [B, H, N] bf16, k: [H, kernel_len <= N] -> y: [B, H, N] bf16; differentiable in u and k. options: those
    of `long_conv_passes` (defaults: the fastest expected)."""
    batch, channels, n = u.shape
    khat = kernel_spectrum(k, plan(n))
    y = long_conv_passes(u.reshape(batch * channels, n), khat, channels=channels, **options)
    return y.reshape(batch, channels, n)


def _numpy_model(n: int) -> float:
    """The passes in float64 against np.convolve (NumPy's FFT past 16K): the largest error over the largest output.
    Two rows as one complex pair, each layout and factored twiddle as the kernels use them."""
    p = plan(n)
    rng = np.random.default_rng(0)
    u, k = rng.standard_normal((2, n)), rng.standard_normal(n - 7)
    tile = min(64, p.inner)
    exact = factors(p, tile, matrix_dtype=np.float64, table_dtype=np.float64, twiddle_dtype=np.float64)
    f = {name: a[0] + 1j * a[1] if name not in ("fa", "ga") else a for name, a in exact._asdict().items()}
    x = u.reshape(2, HALF, p.m)
    y = (f["fa"][0, 0] + 1j * f["fa"][1, 0]) @ x[0] + (f["fa"][0, 1] + 1j * f["fa"][1, 1]) @ x[1]   # A
    t1 = (f["ta"][:, :, None] * f["tb"][None]).transpose(1, 0, 2).reshape(R1, p.m)                  # [k1, m]
    y = (y * t1).reshape(R1, p.outer, p.inner).transpose(1, 0, 2)                                   # [n2, k1, n3]
    khat = np.fft.fft(k, p.length).reshape(p.m // p.outer, p.outer, R1).transpose(1, 2, 0) / p.length
    if p.r3 > 1:                                                                                     # C
        y = np.einsum("kn,nac->kac", f["f2"], y) * f["t2"][:, None, :]
    w = ((y @ f["fl"]) * khat) @ np.conj(f["fl"])
    if p.r3 > 1:
        w = np.einsum("kn,nac->kac", np.conj(f["f2"]), w * np.conj(f["t2"][:, None, :]))
    w = w * np.conj(f["ca"][:, :, None] * f["cb"][None])
    w = w.transpose(1, 0, 2).reshape(R1, p.m)
    g = [f["ga"][q, 0] @ w.real + f["ga"][q, 1] @ w.imag for q in range(2)]                          # A'
    out = np.stack([gq.reshape(-1) for gq in g])
    if n <= 16384:
        expected = np.stack([np.convolve(row, k)[:n] for row in u])
    else:  # np.convolve is O(n²); NumPy's own float64 FFT is the other way to the same numbers
        expected = np.fft.irfft(np.fft.rfft(u, p.length) * np.fft.rfft(k, p.length), p.length)[:, :n]
    return float(np.abs(out - expected).max() / np.abs(expected).max())
