"""The causal Monarch long convolution as Pallas Mosaic GPU (Hopper) kernels, forward and backward.

`long_conv(impl="monarch" or "auto")` takes this path on Hopper GPUs (compute capability 9.x) for bf16 u,
causal, seq from 513 to 4096 (u zero-padded to n = 1024, 2048 or 4096; `applies` says so). Elsewhere the
portable kernel (`long_conv_monarch_pallas.py`) or the XLA matmuls run. On an H200 it was 1.6–2.3x faster
than jnp.fft (docs/long_conv.md has the table). The Pallas GPU interpreter runs it on CPU for the tests.

Shapes: the kernels work on rows, u: [rows, n] bf16 with rows = batch · channels (channel = row mod
channels), which `long_conv_monarch_hopper` makes from u: [batch, seq, channels] by a transpose. k:
[channels, kernel_len <= seq]. L = 2n = R1 · r2 with R1 = 128 and r2 = L / 128 ∈ {16, 32, 64}.

The math (checked in float64 by `_numpy_model`): a row x viewed as X[n1, n2] (n = r2·n1 + n2; rows
n1 >= 64 are the causal zero padding), frequencies k = k1 + 128·k2:

    Y1 = (F1[:, :64] @ X) ⊙ T           F1: [128, 128] DFT, T[k1, n2] = ω_L^(k1·n2)   (left multiply)
    Z  = Y1 @ F2                        F2: [r2, r2] DFT (symmetric)                   (right multiply)
    P  = Z ⊙ K̂                          K̂[k1, k2] = DFT_L(k)[k1 + 128·k2] / L
    W  = (P @ conj(F2)) ⊙ conj(T)
    y  = Re(conj(F1)[:64, :] @ W)        the first n outputs, as [64, r2]

Every matmul is a wgmma with its operands in shared memory in their natural row-major layout: the left
multiplies take the data as the B operand, the right multiplies as the A operand, so nothing is
transposed. The 128 rows of k1 run as two halves of 64 (one wgmma M); the halves are independent until
the last stage, which accumulates both. Complex values are (re, im) planes; the right multiplies need
−Im F2 as a third matrix because a wgmma cannot negate.

`conv_rows`: persistent CTAs (one per SM) of 2 warpgroups. A warpgroup takes one channel at a time: it
makes the channel's K̂ from k's row by the first two phases (Y1, Z) into shared memory, then puts `group`
rows of the channel (batch elements) through each phase together, one wait per phase for all of them: a
phase's fixed cost (0.15–0.6 µs on an H200) is what bounds a lone row. The next rows of u are prefetched by
TMA while the current ones compute; the twiddles and K̂ are bf16 in shared memory (which makes room for the
second warpgroup at n = 4096).

The backward (custom_vjp): du is `conv_rows` on dy with conj(K̂) (the correlation with k); K̂'s cotangent
Σ_b (Re, −Im) Û_b ⊙ conj(D̂_b) is `spectrum_cotangent`, which puts u's and dy's rows through the first two
phases and sums over the batch in registers; k's cotangent is the transpose of `kernel_spectrum` (the same
K̂ by jnp.fft: K̂ is linear in k) applied to it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longseq.ops.long_conv_monarch import real_signal_dft
from longseq.ops.mosaic_gpu import interpret_params, on_hopper  # noqa: F401 (on_hopper: long_conv's dispatch)

Array = jax.Array

R1 = 128
HALF = R1 // 2
LENGTHS = (1024, 2048, 4096)   # the padded n the kernels take
MIN_SEQ = LENGTHS[0] // 2 + 1  # shorter sequences would waste more than half the work on padding
WARPGROUPS = 2


# ----------------------------------------------------------------------------------------------
# Where it applies


def padded_length(seq: int) -> int:
    """The n in LENGTHS a sequence of `seq` is zero-padded to."""
    return next(n for n in LENGTHS if n >= seq)


def applies(seq: int, kernel_len: int, dtype, *, causal: bool) -> bool:
    """Whether the kernels take this problem (on any device; `on_hopper` says whether they can run)."""
    return causal and dtype == jnp.bfloat16 and MIN_SEQ <= seq <= LENGTHS[-1] and kernel_len <= seq


# ----------------------------------------------------------------------------------------------
# Constants and the kernel's spectrum


def constants(n: int):
    """The DFT matrices and twiddles of length L = 2n: (f1 [2,2,64,64] bf16 (re, im of F1[:, :64] by halves of
    k1), twiddle [2,2,64,r2] f32, f2 [3,r2,r2] bf16 (re, im, −im), g1 [2,2,64,64] bf16 (re, im of F1[:64, :]
    by halves of k1)). NumPy arrays: the custom_vjp below must not close over traced constants."""
    length = 2 * n
    r2 = length // R1
    k1 = np.arange(R1)
    f1 = np.exp(-2j * np.pi * np.outer(k1, np.arange(HALF)) / R1)
    twiddle = np.exp(-2j * np.pi * np.outer(k1, np.arange(r2)) / length)
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(r2), np.arange(r2)) / r2)
    g1 = np.stack([f1.T.real, f1.T.imag]).reshape(2, HALF, 2, HALF).transpose(0, 2, 1, 3)

    def halves(z):  # [128, cols] complex -> [re/im, half, 64, cols]
        return np.stack([z.real, z.imag]).reshape(2, 2, HALF, -1)

    bf16 = jnp.bfloat16
    return (halves(f1).astype(bf16), halves(twiddle).astype(np.float32),
            np.stack([f2.real, f2.imag, -f2.imag]).astype(bf16), g1.astype(bf16))


def kernel_spectrum(k: Array, n: int) -> Array:
    """k: [channels, kernel_len <= n] -> K̂: [channels, re/im, half, 64, r2] float32 in the kernels' order
    (index k1 + 128·k2), 1/L folded in, by jnp.fft: what `conv_rows` makes in shared memory (there in bf16).
    The backward takes its transpose for k's cotangent."""
    length = 2 * n
    r2 = length // R1
    planes = real_signal_dft(k, length) / length                             # index k1 + 128·k2
    planes = planes.reshape(k.shape[0], 2, r2, R1).transpose(0, 1, 3, 2)     # [channels, re/im, k1, k2]
    return planes.reshape(k.shape[0], 2, 2, HALF, r2)


# ----------------------------------------------------------------------------------------------
# Kernel helpers


def _smem(shape, r2, dtype=jnp.bfloat16):
    """Shared memory in wgmma's tiled, swizzled layout. Both operands of a wgmma need the same swizzle, so
    every bf16 buffer takes the one of the narrowest (r2 columns); float32 ones the same bytes."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, itemsize * r2)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def _store_product(ref, a_re, a_im, t_re, t_im, conj=False):
    """ref[0], ref[1] = (a_re + i a_im) · (t_re + i t_im) (or · its conjugate), as bf16."""
    if conj:
        re, im = a_re * t_re + a_im * t_im, a_im * t_re - a_re * t_im
    else:
        re, im = a_re * t_re - a_im * t_im, a_re * t_im + a_im * t_re
    ref[0] = re.astype(jnp.bfloat16)
    ref[1] = im.astype(jnp.bfloat16)


def _copy_constants(pairs, barrier):
    """TMA copies of the DFT matrices and twiddles into shared memory, one per [64, cols] plane (a copy
    handles at most 5 dimensions after tiling). pairs: (gmem ref, smem ref) with 3 or 4 dimensions."""
    for src, dst in pairs:
        for index in np.ndindex(*src.shape[:-2]):
            plgpu.copy_gmem_to_smem(src.at[index], dst.at[index], barrier)


def _wgmma_helpers(r2, interpret):
    """(load, matmuls) for the kernels below."""
    def load(ref):  # the GPU interpreter has no plgpu.load (and no layouts)
        if interpret is not None:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=True)

    def matmuls(*sums):
        """For each sum, a list of (a, b) ref pairs: Σ a @ b as float32 [64, r2]. All the wgmmas are issued
        before the first result is awaited."""
        def body(*accs):
            for acc, pairs in zip(accs, sums):
                for a, b in pairs:
                    plgpu.wgmma(acc, a, b)
            return tuple(acc[...] for acc in accs)
        return pl.run_scoped(body, *[plgpu.ACC((HALF, r2), jnp.float32) for _ in sums])

    return load, matmuls


def default_group(n: int) -> int:
    """Rows per phase that keep the accumulators in registers: 4 at n = 1024, 2 at 2048, 1 at 4096."""
    return {1024: 4, 2048: 2}.get(n, 1)


def cotangent_config(n: int) -> tuple[int, int]:
    """(group, warpgroups) of `spectrum_cotangent` that fit shared memory and registers."""
    return {1024: (4, 2), 2048: (1, 2)}.get(n, (1, 1))


def _check_rows(u, channels: int, group: int):
    rows, n = u.shape
    if n not in LENGTHS:
        raise ValueError(f"u: the kernels take n in {', '.join(map(str, LENGTHS))}, got {n}")
    if rows % channels:
        raise ValueError(f"channels: {channels} must divide the rows {rows}")
    if (rows // channels) % group:
        raise ValueError(f"group: {group} must divide the batch {rows // channels}")


# ----------------------------------------------------------------------------------------------
# Kernels


def kernel_rows(k: Array, n: int) -> Array:
    """k: [channels, kernel_len <= n] -> [channels, n] bf16: k zero-padded to n and divided by L = 2n (a power
    of two, so exactly), the kernels' input from which `conv_rows` makes K̂ itself."""
    return (jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n - k.shape[1]))) / (2 * n)).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("channels", "conj_khat", "group", "ctas", "wgs", "interpret"))
def conv_rows(u, k_rows, *, channels: int, conj_khat: bool = False, group: int = 1, ctas: int = 132,
              wgs: int = WARPGROUPS, interpret=None):
    """y = the causal convolution of each row with its channel's kernel (with conj_khat: the correlation).

    u: [rows, n] bf16, rows = batch · channels, batch divisible by group; k_rows: `kernel_rows(k, n)` ->
    y: [rows, n] bf16. A warpgroup makes its channel's K̂ (or conj(K̂)) from k_rows by the first two phases
    of the transform, into shared memory, before the channel's rows. `ctas` persistent CTAs of `wgs`
    warpgroups; interpret: `interpret_params()` on CPU.
    """
    _check_rows(u, channels, group)
    rows, n = u.shape
    batch = rows // channels
    r2 = 2 * n // R1
    blocks = batch // group
    ctas = min(ctas, -(-channels // wgs))
    transposed_g1 = interpret is None
    f1c, twc, f2c, g1c = constants(n)
    twc = twc.astype(jnp.bfloat16)
    load, matmuls = _wgmma_helpers(r2, interpret)

    def body(u_ref, k_ref, f1_ref, tw_ref, f2_ref, g1_ref, y_ref, x_s, f1_s, f2_s, tw_s, y1_s, kh_s, *rest):
        if transposed_g1:
            const_bar, x_bar, k_bar = rest
            g1 = lambda c, half: f1_s.at[c, half].transpose((1, 0))  # noqa: E731
        else:
            g1_s, const_bar, x_bar, k_bar = rest
            g1 = lambda c, half: g1_s.at[c, half]  # noqa: E731
        wg = lax.axis_index("wg")
        first = lax.axis_index("cta") * wgs + wg
        stride = ctas * wgs
        count = (channels - first + stride - 1) // stride * blocks  # iteration i: block i mod blocks of a channel

        def channel_of(i):
            return first + (i // blocks) * stride

        def rows_of(i):
            return [(lax.rem(i, blocks) * group + g) * channels + channel_of(i) for g in range(group)]

        def fetch(i, slot):
            for g, row in enumerate(rows_of(i)):
                plgpu.copy_gmem_to_smem(u_ref.at[row], x_s.at[wg, slot, g], x_bar.at[2 * wg + slot])

        pairs = [(f1_ref, f1_s), (tw_ref, tw_s), (f2_ref, f2_s)] + ([] if transposed_g1 else [(g1_ref, g1_s)])
        pl.when(wg == 0)(lambda: _copy_constants(pairs, const_bar))

        pl.when(count > 0)(lambda: fetch(0, 0))
        plgpu.barrier_wait(const_bar)

        @pl.loop(0, count)
        def _(i):
            slot = lax.rem(i, 2)
            new_channel = lax.rem(i, blocks) == 0

            @pl.when(new_channel)
            def _():  # the channel's K̂ (the last block's reads of the previous one are done)
                k_s = kh_s.at[wg, 0, 0]  # k's row lands in the plane that half 0's real part takes last
                plgpu.copy_gmem_to_smem(k_ref.at[channel_of(i)], k_s, k_bar.at[wg])
                plgpu.barrier_wait(k_bar.at[wg])
                y1 = y1_s.at[wg, 0]
                for half in (1, 0):
                    a_re, a_im = matmuls([(f1_s.at[0, half], k_s)], [(f1_s.at[1, half], k_s)])
                    t_re, t_im = (load(tw_s.at[c, half]).astype(jnp.float32) for c in range(2))
                    _store_product(y1, a_re, a_im, t_re, t_im)
                    plgpu.commit_smem()
                    z_re, z_im = matmuls([(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[2])],
                                         [(y1.at[0], f2_s.at[1]), (y1.at[1], f2_s.at[0])])
                    kh_s.at[wg, 0, half][...] = z_re.astype(jnp.bfloat16)
                    kh_s.at[wg, 1, half][...] = (-z_im if conj_khat else z_im).astype(jnp.bfloat16)
                plgpu.commit_smem()

            @pl.when(i + 1 < count)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the other slot's outputs have left
                fetch(i + 1, 1 - slot)

            plgpu.barrier_wait(x_bar.at[2 * wg + slot])
            xs = [x_s.at[wg, slot, g] for g in range(group)]
            y1s = [y1_s.at[wg, g] for g in range(group)]

            def transform(*y_accs):
                for half in range(2):
                    a = matmuls(*[[(f1_s.at[c, half], x)] for c in range(2) for x in xs])
                    t_re, t_im = (load(tw_s.at[c, half]).astype(jnp.float32) for c in range(2))
                    for y1, a_re, a_im in zip(y1s, a[:group], a[group:]):
                        _store_product(y1, a_re, a_im, t_re, t_im)
                    plgpu.commit_smem()
                    z = matmuls(*[[(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[2])] for y1 in y1s],
                                *[[(y1.at[0], f2_s.at[1]), (y1.at[1], f2_s.at[0])] for y1 in y1s])
                    k_re, k_im = (load(kh_s.at[wg, c, half]).astype(jnp.float32) for c in range(2))
                    for y1, z_re, z_im in zip(y1s, z[:group], z[group:]):
                        _store_product(y1, z_re, z_im, k_re, k_im)
                    plgpu.commit_smem()
                    w = matmuls(*[[(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[1])] for y1 in y1s],
                                *[[(y1.at[1], f2_s.at[0]), (y1.at[0], f2_s.at[2])] for y1 in y1s])
                    t_re, t_im = (load(tw_s.at[c, half]).astype(jnp.float32) for c in range(2))
                    for y1, w_re, w_im in zip(y1s, w[:group], w[group:]):
                        _store_product(y1, w_re, w_im, t_re, t_im, conj=True)
                    plgpu.commit_smem()
                    for y_acc, y1 in zip(y_accs, y1s):  # this half's share of y (awaited by the next matmuls)
                        plgpu.wgmma(y_acc, g1(0, half), y1.at[0])
                        plgpu.wgmma(y_acc, g1(1, half), y1.at[1])
                return tuple(y_acc[...] for y_acc in y_accs)

            ys = pl.run_scoped(transform, *[plgpu.ACC((HALF, r2), jnp.float32) for _ in range(group)])
            for x, y in zip(xs, ys):  # out through the input's slot
                x[...] = y.astype(jnp.bfloat16)
            plgpu.commit_smem()
            for x, row in zip(xs, rows_of(i)):
                plgpu.copy_smem_to_gmem(x, y_ref.at[row])

        plgpu.wait_smem_to_gmem(0)

    scratch = [_smem((wgs, 2, group, HALF, r2), r2), _smem((2, 2, HALF, HALF), r2), _smem((3, r2, r2), r2),
               _smem((2, 2, HALF, r2), r2), _smem((wgs, group, 2, HALF, r2), r2), _smem((wgs, 2, 2, HALF, r2), r2)]
    if not transposed_g1:
        scratch.append(_smem((2, 2, HALF, HALF), r2))
    scratch += [plgpu.Barrier(num_arrivals=11 if transposed_g1 else 15),
                plgpu.Barrier(num_arrivals=group, num_barriers=2 * wgs),
                plgpu.Barrier(num_arrivals=1, num_barriers=wgs)]
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((rows, HALF, r2), u.dtype),
        grid=(ctas,), grid_names=("cta",), num_threads=wgs, thread_name="wg", scratch_types=scratch,
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), k_rows.reshape(channels, HALF, r2), f1c, twc, f2c, g1c).reshape(rows, n)


@functools.partial(jax.jit, static_argnames=("channels", "group", "ctas", "wgs", "interpret"))
def spectrum_cotangent(u, dy, *, channels: int, group: int = 1, ctas: int = 132, wgs: int = 1, interpret=None):
    """The cotangent of K̂ for y = conv_rows(u, K̂): Σ over a channel's rows of (Re, −Im) of Û ⊙ conj(D̂),
    with Û and D̂ the kernel-order spectra of u and dy.

    u, dy: [rows, n] bf16 (rows = batch · channels, batch divisible by group) -> [channels, re/im, half, 64, r2]
    float32. A unit of work is (channel, half of k1); a warpgroup loops over its units and, in each, over
    the batch in blocks of `group` rows (their u and dy through each phase together, the next block
    prefetched by TMA).
    """
    _check_rows(u, channels, group)
    rows, n = u.shape
    batch = rows // channels
    r2 = 2 * n // R1
    blocks = batch // group
    units = 2 * channels
    ctas = min(ctas, -(-units // wgs))
    f1c, twc, f2c, _ = constants(n)
    load, matmuls = _wgmma_helpers(r2, interpret)

    def body(u_ref, dy_ref, f1_ref, tw_ref, f2_ref, out_ref, x_s, f1_s, f2_s, tw_s, y1_s, out_s, const_bar, x_bar):
        wg = lax.axis_index("wg")
        first = lax.axis_index("cta") * wgs + wg
        stride = ctas * wgs
        my_units = (units - first + stride - 1) // stride
        count = my_units * blocks  # iteration i: block i mod blocks of unit i div blocks

        def rows_of(i):
            channel = (first + (i // blocks) * stride) // 2
            return [(lax.rem(i, blocks) * group + g) * channels + channel for g in range(group)]

        def fetch(i, slot):
            for g, row in enumerate(rows_of(i)):
                plgpu.copy_gmem_to_smem(u_ref.at[row], x_s.at[wg, slot, 0, g], x_bar.at[2 * wg + slot])
                plgpu.copy_gmem_to_smem(dy_ref.at[row], x_s.at[wg, slot, 1, g], x_bar.at[2 * wg + slot])

        pl.when(wg == 0)(lambda: _copy_constants([(f1_ref, f1_s), (tw_ref, tw_s), (f2_ref, f2_s)], const_bar))

        pl.when(count > 0)(lambda: fetch(0, 0))
        plgpu.barrier_wait(const_bar)
        y1s = [y1_s.at[wg, j] for j in range(2 * group)]  # u's rows, then dy's

        @pl.loop(0, my_units)
        def _(j):
            unit = first + j * stride
            channel, half = unit // 2, lax.rem(unit, 2)

            def per_block(block, acc):
                i = j * blocks + block
                slot = lax.rem(i, 2)
                pl.when(i + 1 < count)(lambda: fetch(i + 1, 1 - slot))
                plgpu.barrier_wait(x_bar.at[2 * wg + slot])
                xs = [x_s.at[wg, slot, side, g] for side in range(2) for g in range(group)]
                a = matmuls(*[[(f1_s.at[c, half], x)] for c in range(2) for x in xs])
                t_re, t_im = load(tw_s.at[0, half]), load(tw_s.at[1, half])
                for y1, a_re, a_im in zip(y1s, a[:2 * group], a[2 * group:]):
                    _store_product(y1, a_re, a_im, t_re, t_im)
                plgpu.commit_smem()
                z = matmuls(*[[(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[2])] for y1 in y1s],
                            *[[(y1.at[0], f2_s.at[1]), (y1.at[1], f2_s.at[0])] for y1 in y1s])
                z_re, z_im = z[:2 * group], z[2 * group:]
                acc_re, acc_im = acc
                for g in range(group):  # (Re, −Im) of Û · conj(D̂)
                    u_re, u_im, d_re, d_im = z_re[g], z_im[g], z_re[group + g], z_im[group + g]
                    acc_re = acc_re + u_re * d_re + u_im * d_im
                    acc_im = acc_im + u_re * d_im - u_im * d_re
                return acc_re, acc_im

            zero = jnp.zeros((HALF, r2), jnp.float32)
            if interpret is None:
                zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
            acc_re, acc_im = lax.fori_loop(0, blocks, per_block, (zero, zero))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_s[wg, 0] = acc_re
            out_s[wg, 1] = acc_im
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s.at[wg, 0], out_ref.at[channel, 0, half])
            plgpu.copy_smem_to_gmem(out_s.at[wg, 1], out_ref.at[channel, 1, half])

        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((channels, 2, 2, HALF, r2), jnp.float32),
        grid=(ctas,), grid_names=("cta",), num_threads=wgs, thread_name="wg",
        scratch_types=[_smem((wgs, 2, 2, group, HALF, r2), r2), _smem((2, 2, HALF, HALF), r2),
                       _smem((3, r2, r2), r2), _smem((2, 2, HALF, r2), r2, jnp.float32),
                       _smem((wgs, 2 * group, 2, HALF, r2), r2), plgpu.SMEM((wgs, 2, HALF, r2), jnp.float32),
                       plgpu.Barrier(num_arrivals=11), plgpu.Barrier(num_arrivals=2 * group, num_barriers=2 * wgs)],
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), dy.reshape(rows, HALF, r2), f1c, twc, f2c)


# ----------------------------------------------------------------------------------------------
# The differentiable convolution


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132


def long_conv_monarch_hopper(u: Array, k: Array, *, interpret=None, ctas: int | None = None) -> Array:
    """Causal depthwise long convolution, as `longseq.ops.long_conv(u, k, causal=True)`.

    Args:
      u: [batch, seq, channels] bf16, 513 <= seq <= 4096 (zero-padded to 1024, 2048 or 4096 inside).
      k: [channels, kernel_len <= seq].
      interpret: False: compiled for a Hopper GPU; `interpret_params()`: run in the Pallas GPU interpreter
        (CPU); None (default): the interpreter on a CPU device, compiled elsewhere.
      ctas: persistent CTAs per kernel (default: the GPU's SM count; 2 in the interpreter).

    Returns:
      y: [batch, seq, channels] bf16, differentiable in u and k.
    """
    batch, seq, channels = u.shape
    if not applies(seq, k.shape[1], u.dtype, causal=True):
        raise ValueError(f"u, k: the Hopper Monarch kernel takes bf16 u with {MIN_SEQ} <= seq <= {LENGTHS[-1]} "
                         f"and kernel_len <= seq, got u {u.dtype} {u.shape}, k {k.shape}")
    if interpret is None and jax.devices()[0].platform == "cpu":
        interpret = interpret_params()
    interpret = interpret or None  # the kernels' convention: None compiles
    ctas = ctas or (2 if interpret is not None else _sm_count())
    n = padded_length(seq)
    group = math.gcd(batch, default_group(n))  # the largest power of two up to the default that divides the batch
    cotangent_group, cotangent_wgs = cotangent_config(n)
    cotangent_group = math.gcd(batch, cotangent_group)
    options = dict(channels=channels, ctas=ctas, interpret=interpret)

    @jax.custom_vjp
    def conv(rows, k):
        return conv_rows(rows, kernel_rows(k, n), group=group, **options)

    def conv_fwd(rows, k):
        return conv(rows, k), (rows, k)

    def conv_bwd(residuals, dy):
        rows, k = residuals
        du = conv_rows(dy, kernel_rows(k, n), conj_khat=True, group=group, **options)  # the correlation with k
        khat_cotangent = spectrum_cotangent(rows, dy, group=cotangent_group, wgs=cotangent_wgs, **options)
        (dk,) = jax.linear_transpose(lambda k: kernel_spectrum(k, n), k)(khat_cotangent)  # K̂ is linear in k
        return du, dk

    conv.defvjp(conv_fwd, conv_bwd)
    rows = jnp.pad(u.transpose(0, 2, 1), ((0, 0), (0, 0), (0, n - seq))).reshape(batch * channels, n)
    y = conv(rows, k)
    return y.reshape(batch, channels, n)[:, :, :seq].transpose(0, 2, 1)


def _numpy_model(n: int = 2048) -> float:
    """The factorisation above in float64 against np.convolve: the largest error over the largest output."""
    rng = np.random.default_rng(0)
    u, k = rng.standard_normal(n), rng.standard_normal(n)
    length, r2 = 2 * n, 2 * n // R1
    f1 = np.exp(-2j * np.pi * np.outer(np.arange(R1), np.arange(R1)) / R1)
    twiddle = np.exp(-2j * np.pi * np.outer(np.arange(R1), np.arange(r2)) / length)
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(r2), np.arange(r2)) / r2)
    k_hat = (np.fft.fft(k, length) / length).reshape(r2, R1).T
    z = (f1[:, :HALF] @ u.reshape(HALF, r2) * twiddle) @ f2
    w = (z * k_hat) @ np.conj(f2) * np.conj(twiddle)
    y = np.real(np.conj(f1)[:HALF] @ w).reshape(-1)
    expected = np.convolve(u, k)[:n]
    return float(np.abs(y - expected).max() / np.abs(expected).max())
