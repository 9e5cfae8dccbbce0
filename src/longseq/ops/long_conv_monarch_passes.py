"""The causal Monarch long convolution past 4K as three portable Pallas passes through HBM, forward and backward.

`long_conv(impl="monarch")` takes this path on GPUs (and in Pallas interpret mode on CPU) for bf16 u, causal,
4096 < seq <= 2^20 (u zero-padded to a power of two n); "auto" takes it where it was measured faster than
jnp.fft (`AUTO_LENGTHS`; docs/long_conv.md has the table). One row's spectrum does not fit one CTA's shared
memory past 4K, so unlike the Hopper kernels (`long_conv_monarch_hopper.py`, a chain of 15 dependent phases
per row in one kernel) each pass here is a tiled GEMM with its complex epilogue fused, and the intermediates
are complex bf16 in HBM. The passes are ordinary Pallas (Triton on GPUs), so TPUs could lower the same code.
experiments/long_conv_kernel/NOTES.md has the design's history and measurements.

Shapes: the passes work on rows, u: [rows, n] bf16 with rows = batch · channels (channel = row mod channels),
which `long_conv_monarch_passes` makes from u: [batch, seq, channels] by a transpose. k: [channels,
kernel_len <= seq].

L = 2N = r1 · M, with r1 = 128, or 256 at N = 16K, or 512 at 512K and 1M (`plan`). Two factors (M = r2 <= 128:
N <= 8K, and 16K), or three (M = r2 · r3, r2, r3 >= 16). x is viewed as X[n1, n2, n3] (n = n1·M + n2·r3 + n3; rows
n1 >= r1/2 are the causal zero padding), the spectrum comes out as Z[k1, k2, k3] = DFT_L(x)[k1 + r1·k2 +
r1·r2·k3], and K̂ is laid out the same way (1/L folded in). A row's intermediates are stored as [re/im, outer,
r1, inner] = [2, n2, k1, n3] (three factors) or [2, 1, k1, n2] (two: outer = 1, inner = r2), so the middle pass
reads whole k1 slabs:

    A    Y1 = (F1[:, :r1/2] @ X) ⊙ T1           T1[k1, m] = ω_L^(k1·m), m = n2·r3 + n3
    C    per k1 (a group of G k1 slabs per program):
           Y2 = (F2 @ Y1[:, k1, :]) ⊙ T2             T2[k2, n3] = ω_M^(k2·n3)                 (three factors)
           W2 = ((Y2 @ Fl) ⊙ K̂) @ conj(Fl)           Fl: the last factor (r3, or r2 with two factors)
           W1 = (conj(F2) @ (W2 ⊙ conj(T2))) ⊙ conj(T1)   (with two factors: W1 = W2 ⊙ conj(T1))
    A'   y  = Re(conj(F1)[:r1/2, :] @ W1)

T1 is never stored whole: T1[k1, n2·r3 + n3] = ω_L^(k1·r3·n2) · ω_L^(k1·n3) is formed in registers from two
small float32 tables (pass A: ω_L^(k1·c·tile) · ω_L^(k1·j) for column block c). T2 is one [r2, r3] table.

Pairs (even batch): the rows of batch b and b + B/2 (same channel) go through as one complex row
u_b + i·u_{b+B/2}; A takes the complex input, A' returns the real and imaginary parts as the two outputs. The
maps are complex-linear and K̂ is the spectrum of a real kernel, so this is exact, and it halves the
intermediates. One program of C takes (channel, k1 group) and loops over the batch, so K̂ is read once per
channel.

HBM bytes per row of N (u, y: 2N each; an intermediate: 8N, or 4N per row for a pair; K̂ in bf16: 8N per
channel), `traffic()`:
    forward   A 2N + 8N/P | C 16N/P + 8N/B | A' 8N/P + 2N         = 4N + 32N/P + 8N/B  (P = 2: 20N; 1: 36N)
    backward  A on dy and u 2 × (2N + 8N/P) | C (du and K̂'s cotangent, fused) 24N/P + 24N/B | A' 8N/P + 2N
The backward: du by the same passes with conj(K̂); K̂'s cotangent Σ_b (Re, −Im) Û_b ⊙ conj(D̂_b) from A and
the first half of C on u and dy, reduced over the batch inside C. With pairs the sum gains
i·(Û_b' conj(D̂_b) − Û_b conj(D̂_b')), i times a Hermitian spectrum, which adds nothing to a real kernel's
gradient: K̂'s cotangent is right after projection onto spectra of real kernels, which `kernel_spectrum`'s VJP
does (so `conv_rows` wants the K̂ of a real kernel). Checked in float64 by `_numpy_model`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from longseq.ops.long_conv_monarch import real_signal_dft

CHUNK = 128             # k1 rows pass A makes at a time, and outputs pass A' makes at a time
# The first factor r1 where it is not 128, by N, measured faster on an H200 (experiments/long_conv_kernel/NOTES.md):
# at 16K, 128 leaves M = 16 · 16 (A and A' move 32-byte runs), 256 two factors with M = 128 (forward + backward
# 1.23x -> 1.60x jnp.fft at 8 x 768 x 16K); at 2^19 and 2^20, 128 leaves pass C [64, 128] or [128, 128] blocks,
# which run at 4-10% of the copy bandwidth, 512 [32, 2, 128] ones (1 x 256 x 1M: 166 -> 50 ms). At 8K and
# 64K-256K a wider first factor was no faster or slower.
FIRST_FACTOR = {1 << 14: 256, 1 << 19: 512, 1 << 20: 512}
MIN_LENGTH, MAX_LENGTH = 1 << 10, 1 << 20  # the n the passes take (powers of two)
MIN_SEQ = 4097          # shorter causal bf16 sequences take the Hopper kernels or the fused portable kernel
# Where "auto" takes the passes: an even batch (rows go through in pairs) and these padded n, where they were
# 1.2-1.7x jnp.fft forward and forward + backward on an H200 (B x 768-1024 channels, B = 2-8). At 8K they won
# at batch 8 only (batch 2 not measured), at 2^18-2^20 they were 0.85-0.99x (the middle pass's 128-point factors
# are compute-bound), and an odd batch runs unpaired (batch 1: 0.76x at 16K). docs/long_conv.md.
AUTO_LENGTHS = (1 << 14, 1 << 15, 1 << 16, 1 << 17)


class Plan(NamedTuple):
    n: int
    length: int
    r1: int
    r2: int
    r3: int  # 1: two factors

    @property
    def m(self) -> int:
        return self.length // self.r1

    @property
    def half(self) -> int:
        """The n1 rows of x that can be nonzero (the rest is the causal zero padding)."""
        return self.r1 // 2

    @property
    def outer(self) -> int:
        """The n2 (k2) axis of a row's layout [2, outer, r1, inner]: r2 with three factors, 1 with two."""
        return self.r2 if self.r3 > 1 else 1

    @property
    def inner(self) -> int:
        """The n3 (k3) axis, which pass C contracts last: r3 with three factors, r2 with two."""
        return self.r3 if self.r3 > 1 else self.r2


def padded_length(seq: int) -> int:
    """The n (a power of two, at least MIN_LENGTH) a sequence of `seq` is zero-padded to."""
    return max(MIN_LENGTH, 1 << (seq - 1).bit_length())


def applies(seq: int, kernel_len: int, dtype, *, causal: bool) -> bool:
    """Whether `long_conv(impl="monarch")` takes the passes for this problem (on a GPU, or interpreted)."""
    return causal and dtype == jnp.bfloat16 and MIN_SEQ <= seq <= MAX_LENGTH and kernel_len <= seq


def faster_than_fft(batch: int, seq: int) -> bool:
    """Whether the passes were measured faster than jnp.fft on this problem (on a GPU): "auto" takes them."""
    return batch % 2 == 0 and padded_length(seq) in AUTO_LENGTHS


def plan(n: int, r1: int | None = None) -> Plan:
    """The factors for N = n (a power of two, 1024 … 2^20): r1 (128, 256 or 512; None: `FIRST_FACTOR`'s or 128),
    then r3 (the inner axis) takes the larger share of M."""
    if n < MIN_LENGTH or n > MAX_LENGTH or n & (n - 1):
        raise ValueError(f"u: padded length {n}: the passes take powers of two from {MIN_LENGTH} to {MAX_LENGTH}")
    length = 2 * n
    r1 = r1 or FIRST_FACTOR.get(n, 128)
    if r1 not in (128, 256, 512) or length // r1 < 16:
        raise ValueError(f"r1={r1}: the first factor is 128, 256 or 512, and at most L / 16 (L = {length})")
    m = length // r1
    if m <= 128:
        return Plan(n, length, r1, m, 1)
    r3 = min(128, m // 16)
    return Plan(n, length, r1, m // r3, r3)


def _planes(z: np.ndarray, dtype) -> np.ndarray:
    """A complex array as its [re, im] planes (NumPy: constants, never tracers the custom_vjp could close over)."""
    return np.stack([z.real, z.imag]).astype(dtype)


def _dft(r: int) -> np.ndarray:
    return np.exp(-2j * np.pi * np.outer(np.arange(r), np.arange(r)) / r)


def _omega(exponent: np.ndarray, period: int) -> np.ndarray:
    return np.exp(-2j * np.pi * (exponent % period) / period)


class Factors(NamedTuple):
    fa: np.ndarray   # [2 (out re/im), 2 (in re/im), r1, r1/2] bf16: F1[:, :r1/2] as a real block matrix (pass A)
    ga: np.ndarray   # [2 (out re/im), 2 (in re/im), r1/2, r1] bf16: conj(F1)[:r1/2, :] likewise (pass A')
    ta: np.ndarray   # [2, M / tile, r1] f32: ω_L^(k1·c·tile), column block c of pass A
    tb: np.ndarray   # [2, r1, tile] f32: ω_L^(k1·j)                   (T1 = ta[c] ⊗ tb in pass A)
    ca: np.ndarray   # [2, outer, r1] f32: ω_L^(k1·r3·n2) (ones with two factors)
    cb: np.ndarray   # [2, r1, inner] f32: ω_L^(k1·n3)               (T1 = ca ⊗ cb in pass C)
    f2: np.ndarray   # [2, r2, r2] bf16 (three factors)
    t2: np.ndarray   # [2, r2, r3] table_dtype (three factors)
    fl: np.ndarray   # [2, inner, inner] bf16: the last factor


def factors(p: Plan, tile: int = 64, matrix_dtype=jnp.bfloat16, table_dtype=jnp.bfloat16,
            twiddle_dtype=np.float32) -> Factors:
    f1 = _dft(p.r1)[:, :p.half]
    g1 = np.conj(_dft(p.r1)[:p.half, :])
    fa = np.stack([np.stack([f1.real, -f1.imag]), np.stack([f1.imag, f1.real])])   # (re, im) of F1 (x_a + i x_b)
    ga = np.stack([np.stack([g1.real, -g1.imag]), np.stack([g1.imag, g1.real])])   # (re, im) of conj(G) W
    k1 = np.arange(p.r1)
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
    """k: [channels, kernel_len <= N] -> K̂: [channels, re/im, outer, r1, inner] (dtype), pass C's order, / L."""
    channels = k.shape[0]
    planes = real_signal_dft(k, p.length) / p.length
    # k = k1 + r1·k2 (+ r1·r2·k3) -> [k2, k1, k3] (three factors) or [1, k1, k2] (two)
    return planes.reshape(channels, 2, p.m // p.outer, p.outer, p.r1).transpose(0, 1, 3, 4, 2).astype(dtype)


def traffic(n: int, batch: int) -> dict:
    """Model HBM bytes per row (one of batch · channels) of each pass, forward and backward: the bytes each
    pass must read and write once, with K̂ (bf16, and its cotangent, float32) counted once per channel."""
    p = 2 if batch % 2 == 0 else 1
    khat_bytes = 2
    spectrum = 8 * n / p                    # one intermediate: 2N complex bf16 values, shared by a pair's rows
    khat = 2 * 2 * n * khat_bytes / batch   # [re/im, 2N] per channel
    cotangent = 2 * 2 * n * 4 / batch
    fwd = {"A": 2 * n + spectrum, "C": 2 * spectrum + khat, "A'": spectrum + 2 * n}
    bwd = {"A(dy), A(u)": 2 * (2 * n + spectrum), "C (du, dK̂)": 3 * spectrum + khat + cotangent,
           "A'": spectrum + 2 * n}
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


def _planes_of(ref):
    """A reader of a ref's (re, im) planes: kernels read their constants at each use, inside their loops."""
    def read():
        return ref[0], ref[1]
    return read


def _chunks(total: int, size: int):
    return [pl.ds(start, min(size, total)) for start in range(0, total, size)]


def _pass_a_kernel(x_ref, f_ref, ta_ref, tb_ref, y_ref, *, pairs, steps):
    """x_ref: [P, R, r1/2, tile] u-like rows (P = 2: a pair's real and imaginary parts), f_ref: [2, P, r1, r1/2],
    ta_ref: [2, r1], tb_ref: [2, r1, tile] -> y_ref: [R, 2, r1, tile] = (F1 @ x) ⊙ (ta ⊗ tb), row by row, in
    chunks of CHUNK k1 rows."""
    r1 = f_ref.shape[2]

    def row(i, carry):  # the constants are read at each use: holding them through the loop spills registers
        for k1 in _chunks(r1, CHUNK):
            x = x_ref[0, i]
            re, im = _dot(f_ref[0, 0, k1], x), _dot(f_ref[1, 0, k1], x)
            if pairs == 2:
                x = x_ref[1, i]
                re, im = re + _dot(f_ref[0, 1, k1], x), im + _dot(f_ref[1, 1, k1], x)
            t1 = _mul((ta_ref[0, k1][:, None], ta_ref[1, k1][:, None]), (tb_ref[0, k1], tb_ref[1, k1]))
            re, im = _mul((re, im), t1)
            y_ref[i, 0, k1] = re.astype(y_ref.dtype)
            y_ref[i, 1, k1] = im.astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, steps, row, 0)


def _pass_a_inverse_kernel(w_ref, g_ref, y_ref, *, pairs, steps):
    """w_ref: [R, 2, r1, tile], g_ref: [P, 2, r1/2, r1] -> y_ref: [P, R, r1/2, tile]: Re (and Im) of conj(G) @ w,
    in chunks of CHUNK outputs and 2 · CHUNK k1 terms."""
    half, r1 = g_ref.shape[2:]

    def row(i, carry):  # each chunk of w is read once per chunk of outputs (one read at r1 <= 256)
        for n1 in _chunks(half, CHUNK):
            ys = [0.0] * pairs
            for k1 in _chunks(r1, 2 * CHUNK):
                w_re, w_im = w_ref[i, 0, k1], w_ref[i, 1, k1]
                for q in range(pairs):
                    ys[q] += _dot(g_ref[q, 0, n1, k1], w_re) + _dot(g_ref[q, 1, n1, k1], w_im)
            for q in range(pairs):
                y_ref[q, i, n1] = ys[q].astype(y_ref.dtype)
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
        """Block dims of the trailing [outer, r1, inner] axes (None: squeezed)."""
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


def _middle_kernel(*refs, slab: _Slab, steps, conj_khat, with_w, with_cotangent):
    """Pass C on a (channel, k1 group): for each of `steps` rows (the batch), y -> spectrum Z; with_w: × K̂
    (or conj(K̂)) and back, into w; with_cotangent: Σ (Re, −Im) Zu ⊙ conj(Z) over the rows of yu, into cot.

    refs: y [steps, 2, block], [yu [steps, 2, block]], [kh [2, block]], fl [2, inner, inner], cb [2, G|-, inner],
    [f2 [2, outer, outer], t2 [2, outer, inner], ca [2, outer, G|-]] (three factors), then the outputs
    [w [steps, 2, block]], [cot [2, block] f32]. `block` is slab.dims without the squeezed axes."""
    refs = list(refs)
    y_ref = refs.pop(0)
    yu_ref = refs.pop(0) if with_cotangent else None
    kh_ref = refs.pop(0) if with_w else None
    fl, cb_ref = _planes_of(refs.pop(0)), refs.pop(0)
    if slab.three:
        f2, t2_ref, ca_ref = _planes_of(refs.pop(0)), refs.pop(0), refs.pop(0)

        def t2():  # [outer, G|-, inner]
            return _f32(slab.broadcast((t2_ref[0], t2_ref[1])))
    if with_w:

        def kh():
            return slab.right((kh_ref[0], kh_ref[1]))
    w_ref = refs.pop(0) if with_w else None
    cot_ref = refs.pop(0) if with_cotangent else None

    def spectrum(ref, i):
        """Row i's Z, the right view (f32)."""
        z = ref[i, 0], ref[i, 1]
        if slab.three:
            z = _bf16(_mul(_left(f2(), slab.left(z)), slab.left(t2())))
        return _right(slab.right(z), fl())

    def t1():
        """T1 on the block, as stored."""
        b = cb_ref[0], cb_ref[1]
        if not slab.three:
            return b
        a = ca_ref[0], ca_ref[1]
        if slab.group == 1:
            return _mul((a[0][:, None], a[1][:, None]), (b[0][None, :], b[1][None, :]))
        return _mul((a[0][:, :, None], a[1][:, :, None]), (b[0][None], b[1][None]))

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
    slab: _Slab           # pass C's forward block
    slab_bwd: _Slab       # pass C's backward block (half the values: it holds three spectra)
    interpret: bool

    def compiler(self, slab=None):
        """Triton's parameters: 8 warps (more in C: a complex f32 block at most 64 registers a thread), two
        pipeline stages (one at N = 8K, r2 = 128, where two overflow an H200's shared memory by 1 KB, and with
        r1 >= 256, whose F1 blocks are four or more times larger)."""
        if self.interpret:
            return dict(interpret=True)
        from jax.experimental.pallas import triton as pltriton

        warps = 8 if slab is None else max(8, min(16, slab.outer * slab.group * slab.inner // 1024))
        stages = 1 if (self.p.r3 == 1 and self.p.r2 == 128) or self.p.r1 > 128 else 2
        return dict(compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages))


TILE = 64                # columns of A's and A''s blocks
ROWS_PER_PROGRAM = 4     # rows A and A' loop over per program
BLOCK = 8192             # about how many spectrum values of a row one program of C holds (half in the backward)


def _configure(rows: int, n: int, channels: int, interpret: bool, r1: int | None = None) -> _Config:
    p = plan(n, r1)
    batch = rows // channels
    pairs = 2 if batch % 2 == 0 else 1

    def slab(values):
        """G = values / M k1 slabs (at least 1); with two factors at least 16 k1 rows."""
        group = max(1, values // p.m) if p.r3 > 1 else max(16, values // p.inner)
        return _Slab(p.outer, _pow2_divisor(p.r1, group), p.inner)

    return _Config(p, factors(p, min(TILE, p.inner)), pairs, rows // pairs, batch // pairs, channels,
                   _pow2_divisor(rows // pairs, ROWS_PER_PROGRAM), slab(BLOCK), slab(BLOCK // 2), interpret)


def _pass_a(x, c: _Config):
    """x: [P, rows, r1/2, M] bf16 -> Y1: [rows, re/im, outer, r1, inner] bf16. Grid (row block, column block)."""
    p, f, step = c.p, c.f, c.rows_per_program
    tile = f.tb.shape[-1]
    per_n2 = p.inner // tile
    return pl.pallas_call(
        functools.partial(_pass_a_kernel, pairs=c.pairs, steps=step),
        grid=(c.rows // step, p.m // tile),
        in_specs=[pl.BlockSpec((c.pairs, step, p.half, tile), lambda r, j: (0, r, 0, j)),
                  pl.BlockSpec((2, c.pairs, p.r1, p.half), lambda r, j: (0, 0, 0, 0)),
                  pl.BlockSpec((2, None, p.r1), lambda r, j: (0, j, 0)), _full(f.tb)],
        out_specs=pl.BlockSpec((step, 2, None, p.r1, tile), lambda r, j: (r, 0, j // per_n2, 0, j % per_n2)),
        out_shape=jax.ShapeDtypeStruct((c.rows, 2, p.outer, p.r1, p.inner), jnp.bfloat16), **c.compiler(),
        name="longseq_monarch_pass_a",
    )(x, f.fa[:, :c.pairs], f.ta, f.tb)


def _pass_a_inverse(w, c: _Config, dtype):
    """W1: [rows, re/im, outer, r1, inner] -> y: [P, rows, r1/2, M]."""
    p, f, step = c.p, c.f, c.rows_per_program
    tile = f.tb.shape[-1]
    per_n2 = p.inner // tile
    return pl.pallas_call(
        functools.partial(_pass_a_inverse_kernel, pairs=c.pairs, steps=step),
        grid=(c.rows // step, p.m // tile),
        in_specs=[pl.BlockSpec((step, 2, None, p.r1, tile), lambda r, j: (r, 0, j // per_n2, 0, j % per_n2)),
                  pl.BlockSpec((c.pairs, 2, p.half, p.r1), lambda r, j: (0, 0, 0, 0))],
        out_specs=pl.BlockSpec((c.pairs, step, p.half, tile), lambda r, j: (0, r, 0, j)),
        out_shape=jax.ShapeDtypeStruct((c.pairs, c.rows, p.half, p.m), dtype), **c.compiler(),
        name="longseq_monarch_pass_a_inverse",
    )(w, f.ga[:c.pairs])


def _pass_c(ys, khat, c: _Config, slab: _Slab, *, conj_khat=False, with_w=True, with_cotangent=False):
    """ys: one or two (y, then yu) [rows, re/im, outer, r1, inner] -> [W1 like y] (with_w: y's spectrum × K̂ or
    conj(K̂), transformed back), [K̂'s cotangent summed over the batch: [channels, re/im, outer, r1, inner] f32]
    (with_cotangent). Grid (channel, k1 group); each program loops over the batch, so K̂ is read once."""
    p, f = c.p, c.f
    shape = (c.batch, c.channels, 2, p.outer, p.r1, p.inner)
    ys = [y.reshape(shape) for y in ys]
    grid = (c.channels, p.r1 // slab.group)
    data = pl.BlockSpec((c.batch, None, 2, *slab.dims), lambda h, j: (0, h, 0, 0, j, 0))
    per_channel = pl.BlockSpec((None, 2, *slab.dims), lambda h, j: (h, 0, 0, j, 0))
    tables = [f.fl, f.cb]
    specs = [_full(f.fl), pl.BlockSpec((2, slab.dims[1], p.inner), lambda h, j: (0, j, 0))]
    if slab.three:
        tables += [f.f2, f.t2, f.ca]
        specs += [_full(f.f2), _full(f.t2), pl.BlockSpec((2, p.outer, slab.dims[1]), lambda h, j: (0, 0, j))]
    out_specs, out_shape = [], []
    if with_w:
        out_specs.append(data)
        out_shape.append(jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    if with_cotangent:
        out_specs.append(per_channel)
        out_shape.append(jax.ShapeDtypeStruct(shape[1:], jnp.float32))
    kernel = functools.partial(_middle_kernel, slab=slab, steps=c.batch, conj_khat=conj_khat, with_w=with_w,
                               with_cotangent=with_cotangent)
    outs = list(pl.pallas_call(
        kernel, grid=grid, in_specs=[data] * len(ys) + ([per_channel] if with_w else []) + specs,
        out_specs=out_specs, out_shape=out_shape, **c.compiler(slab), name="longseq_monarch_pass_c",
    )(*ys, *([khat] if with_w else []), *tables))
    if with_w:
        outs[0] = outs[0].reshape(c.rows, 2, p.outer, p.r1, p.inner)
    return outs


def pass_functions(rows: int, n: int, channels: int, interpret: bool = False, r1: int | None = None) -> dict:
    """The forward passes one at a time, for timing: {"A": u [rows, n] -> Y1, "C": (Y1, K̂ in bf16) -> W1,
    "A'": W1 -> y [rows, n]}."""
    c = _configure(rows, n, channels, interpret, r1)
    return {"A": lambda u: _pass_a(u.reshape(c.pairs, c.rows, c.p.half, c.p.m), c),
            "C": lambda y, khat: _pass_c([y], khat, c, c.slab)[0],
            "A'": lambda w: _pass_a_inverse(w, c, jnp.bfloat16).reshape(rows, n)}


@functools.partial(jax.jit, static_argnames=("channels", "interpret", "r1"))
def conv_rows(u, khat, *, channels: int, interpret: bool = False, r1: int | None = None):
    """y[r] = causal conv of u[r] with channel (r mod channels)'s kernel; differentiable in u and khat.

    Args:
      u: [rows, n] bf16, rows = batch · channels, n a power of two (1024 … 2^20).
      khat: `kernel_spectrum(k, plan(n))` of real kernels k (float32; bf16 in HBM inside).
      channels: H. interpret: Pallas interpret mode (CPU).

    Returns:
      y: [rows, n] like u.
    """
    rows, n = u.shape
    c = _configure(rows, n, channels, interpret, r1)
    khat_in = khat.dtype

    def spectra(x):
        return _pass_a(x.reshape(c.pairs, c.rows, c.p.half, c.p.m), c)

    def forward(x, kh):
        [w] = _pass_c([spectra(x)], kh, c, c.slab)
        return _pass_a_inverse(w, c, x.dtype).reshape(rows, n)

    @jax.custom_vjp
    def conv(u, khat):
        return forward(u, khat.astype(jnp.bfloat16))

    def conv_fwd(u, khat):
        kh = khat.astype(jnp.bfloat16)
        return forward(u, kh), (u, kh)

    def conv_bwd(residuals, dy):
        u, kh = residuals
        yd, yu = spectra(dy.astype(u.dtype)), spectra(u)
        wd, cot = _pass_c([yd, yu], kh, c, c.slab_bwd, conj_khat=True, with_cotangent=True)
        return _pass_a_inverse(wd, c, u.dtype).reshape(rows, n), cot.astype(khat_in)

    conv.defvjp(conv_fwd, conv_bwd)
    return conv(u, khat)


def long_conv_monarch_passes(u: jax.Array, k: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The causal long convolution by the passes (`applies` says when `long_conv` calls it).

    Args:
      u: [batch, seq, channels] bf16, seq <= 2^20.
      k: [channels, kernel_len <= seq].
      interpret: Pallas interpret mode (CPU).

    Returns:
      y: [batch, seq, channels] bf16; differentiable in u and k (k's gradient through `kernel_spectrum`).
    """
    batch, seq, channels = u.shape
    n = padded_length(seq)
    rows = jnp.pad(u, ((0, 0), (0, n - seq), (0, 0))).transpose(0, 2, 1).reshape(batch * channels, n)
    y = conv_rows(rows, kernel_spectrum(k, plan(n)), channels=channels, interpret=interpret)
    return y.reshape(batch, channels, n)[:, :, :seq].transpose(0, 2, 1)


def _numpy_model(n: int, r1: int | None = None) -> float:
    """The passes in float64 against np.convolve (NumPy's FFT past 16K): the largest error over the largest output.
    Two rows as one complex pair, each layout and factored twiddle as the kernels use them."""
    p = plan(n, r1)
    rng = np.random.default_rng(0)
    u, k = rng.standard_normal((2, n)), rng.standard_normal(n - 7)
    tile = min(64, p.inner)
    exact = factors(p, tile, matrix_dtype=np.float64, table_dtype=np.float64, twiddle_dtype=np.float64)
    f = {name: a[0] + 1j * a[1] if name not in ("fa", "ga") else a for name, a in exact._asdict().items()}
    x = u.reshape(2, p.half, p.m)
    y = (f["fa"][0, 0] + 1j * f["fa"][1, 0]) @ x[0] + (f["fa"][0, 1] + 1j * f["fa"][1, 1]) @ x[1]   # A
    t1 = (f["ta"][:, :, None] * f["tb"][None]).transpose(1, 0, 2).reshape(p.r1, p.m)                  # [k1, m]
    y = (y * t1).reshape(p.r1, p.outer, p.inner).transpose(1, 0, 2)                                   # [n2, k1, n3]
    khat = np.fft.fft(k, p.length).reshape(p.m // p.outer, p.outer, p.r1).transpose(1, 2, 0) / p.length
    if p.r3 > 1:                                                                                     # C
        y = np.einsum("kn,nac->kac", f["f2"], y) * f["t2"][:, None, :]
    w = ((y @ f["fl"]) * khat) @ np.conj(f["fl"])
    if p.r3 > 1:
        w = np.einsum("kn,nac->kac", np.conj(f["f2"]), w * np.conj(f["t2"][:, None, :]))
    w = w * np.conj(f["ca"][:, :, None] * f["cb"][None])
    w = w.transpose(1, 0, 2).reshape(p.r1, p.m)
    g = [f["ga"][q, 0] @ w.real + f["ga"][q, 1] @ w.imag for q in range(2)]                          # A'
    out = np.stack([gq.reshape(-1) for gq in g])
    if n <= 16384:
        expected = np.stack([np.convolve(row, k)[:n] for row in u])
    else:  # np.convolve is O(n²); NumPy's own float64 FFT is the other way to the same numbers
        expected = np.fft.irfft(np.fft.rfft(u, p.length) * np.fft.rfft(k, p.length), p.length)[:, :n]
    return float(np.abs(out - expected).max() / np.abs(expected).max())
