"""Prototype (issue #5): the causal Monarch long convolution as Mosaic GPU (Hopper) kernels, forward and backward.

Not wired into `longseq.ops` yet: bf16, causal, N in 1024, 2048, 4096, the [batch, channels, seq] layout. It is
here to be measured (`bench_mgpu.py`, `profile_mgpu.py`, `ablate_mgpu.py` beside it; NOTES.md has the figures)
until its design is fast enough to move to src/. The Pallas GPU interpreter runs it on CPU
(`tests/experiments/test_monarch_mgpu.py`), and `jax.export(..., platforms=["cuda"])` lowers it there.

Shapes: u: [rows, N] with rows = batch · channels (channel = row mod channels); k: [channels, kernel_len <= N];
y like u. L = 2N = R1 · r2 with R1 = 128 and r2 = L / 128 ∈ {16, 32, 64}.

The math (checked in float64 in `_numpy_model`): x viewed as X[n1, n2] (n = r2·n1 + n2, rows n1 >= 64 are
the causal zero padding), frequencies k = k1 + 128·k2:

    Y1 = (F1[:, :64] @ X) ⊙ T           F1: [128, 128] DFT, T[k1, n2] = ω_L^(k1·n2)   (left multiply)
    Z  = Y1 @ F2                        F2: [r2, r2] DFT (symmetric)                   (right multiply)
    P  = Z ⊙ K̂                          K̂[k1, k2] = DFT_L(k)[k1 + 128·k2] / L
    W  = (P @ conj(F2)) ⊙ conj(T)
    y  = Re(conj(F1)[:64, :] @ W)        the first N outputs, as [64, r2]

Every matmul is a wgmma with its operands in shared memory in their natural row-major layout: the left
multiplies take the data as the B operand, the right multiplies as the A operand, so nothing is transposed.
The 128 rows of k1 run as two halves of 64 (one wgmma M); the halves are independent until the last
stage, which accumulates both. Complex values are (re, im) planes; the right multiplies need −Im F2 as a
third matrix because a wgmma cannot negate.

`long_conv_rows`: `ctas` persistent CTAs of `wgs` warpgroups; each warpgroup takes its rows in turn and
prefetches the next row of u by TMA while it computes the current one. The DFT matrices and twiddles are
loaded into shared memory once per CTA, K̂ is read from global memory per row. `long_conv_grouped`: a
warpgroup takes one channel at a time, with its K̂ in shared memory, and puts `group` of its rows through
every phase together (one wait per phase for all of them).
`spectrum_cotangent_rows` is the backward's K̂ cotangent; `long_conv_bhn` wires both into a custom_vjp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

R1 = 128
HALF = R1 // 2


def interpret_params():
    """The Pallas GPU interpreter's parameters (a CPU run of these kernels). jax 0.10 keeps the class in a
    private module; the interpreter has no plgpu.load, no A operand in registers and no transposed refs,
    which is why the kernels below take those paths only when interpret is None."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _smem(shape, r2):
    """bf16 shared memory in wgmma's tiled, swizzled layout. Both operands of a wgmma need the same swizzle,
    so every buffer takes the one of the narrowest (r2 columns)."""
    swizzle = min(128, 2 * r2)
    return plgpu.SMEM(shape, jnp.bfloat16,
                      transforms=(plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)))


def _halves(z: np.ndarray) -> np.ndarray:
    """[128, cols] complex -> [re/im, half, 64, cols]."""
    return np.stack([z.real, z.imag]).reshape(2, 2, HALF, -1)


def constants(n: int):
    """The DFT matrices and twiddles of length L = 2n: (f1 [2,2,64,64] bf16, twiddle [2,2,64,r2] f32,
    f2 [3,r2,r2] bf16 (re, im, −im), g1 [2,2,64,64] bf16 (re, im of F1[:64, :] by halves of k1))."""
    length = 2 * n
    r2 = length // R1
    k1 = np.arange(R1)
    f1 = np.exp(-2j * np.pi * np.outer(k1, np.arange(HALF)) / R1)
    twiddle = np.exp(-2j * np.pi * np.outer(k1, np.arange(r2)) / length)
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(r2), np.arange(r2)) / r2)
    g1 = np.stack([f1.T.real, f1.T.imag]).reshape(2, HALF, 2, HALF).transpose(0, 2, 1, 3)
    return (jnp.asarray(_halves(f1), jnp.bfloat16), jnp.asarray(_halves(twiddle), jnp.float32),
            jnp.asarray(np.stack([f2.real, f2.imag, -f2.imag]), jnp.bfloat16), jnp.asarray(g1, jnp.bfloat16))


def kernel_spectrum_fft(k: jax.Array, n: int) -> jax.Array:
    """k: [channels, kernel_len <= n] -> K̂: [channels, re/im, half, 64, r2] float32 in the kernel's order, / L."""
    length = 2 * n
    r2 = length // R1
    spectrum = jnp.fft.fft(k.astype(jnp.float32), length, axis=-1) / length   # index k1 + 128·k2
    spectrum = spectrum.reshape(k.shape[0], r2, R1).transpose(0, 2, 1)       # [channels, k1, k2]
    return jnp.stack([spectrum.real, spectrum.imag], 1).reshape(k.shape[0], 2, 2, HALF, r2)


def kernel_spectrum(k: jax.Array, n: int, precision=jax.lax.Precision.DEFAULT) -> jax.Array:
    """The same K̂ as `kernel_spectrum_fft` by the kernel's own two factors as XLA matmuls, which give the
    kernel's order directly (no transposes). precision DEFAULT is TF32 on Hopper (K̂ to ~1e-3, below the
    bf16 kernel's own error); HIGHEST for float32."""
    channels, kernel_len = k.shape
    length = 2 * n
    r2 = length // R1
    x = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n - kernel_len))).reshape(channels, HALF, r2)
    k1 = np.arange(R1)
    f1 = np.exp(-2j * np.pi * np.outer(k1, np.arange(HALF)) / R1) / length     # 1/L folded in
    twiddle = np.exp(-2j * np.pi * np.outer(k1, np.arange(r2)) / length)
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(r2), np.arange(r2)) / r2)
    mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    a_re, a_im = mm("kn,hnm->hkm", f1.real.astype(np.float32), x), mm("kn,hnm->hkm", f1.imag.astype(np.float32), x)
    t_re, t_im = twiddle.real.astype(np.float32), twiddle.imag.astype(np.float32)
    a_re, a_im = a_re * t_re - a_im * t_im, a_re * t_im + a_im * t_re
    g_re, g_im = f2.real.astype(np.float32), f2.imag.astype(np.float32)
    z_re = mm("hkm,jm->hkj", a_re, g_re) - mm("hkm,jm->hkj", a_im, g_im)
    z_im = mm("hkm,jm->hkj", a_re, g_im) + mm("hkm,jm->hkj", a_im, g_re)
    return jnp.stack([z_re, z_im], 1).reshape(channels, 2, 2, HALF, r2)


def supports(n: int) -> bool:
    return n in (1024, 2048, 4096)


def _smem_f32(shape, r2):
    """float32 shared memory tiled and swizzled for loads in the wgmma accumulator layout."""
    swizzle = min(128, 4 * r2)
    return plgpu.SMEM(shape, jnp.float32,
                      transforms=(plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle)))


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


@functools.partial(jax.jit, static_argnames=("channels", "ctas", "wgs", "transposed_g1", "interpret", "ablate",
                                             "profile_dir"))
def long_conv_rows(u, khat, consts, *, channels: int, ctas: int = 132, wgs: int = 2, transposed_g1: bool = True,
                   interpret=None, ablate=(), profile_dir: str = ""):
    """y[r] = causal conv of u[r] with the kernel of channel r mod channels. u: [rows, n] bf16.

    Per row and half of k1: stage 1, twiddles, stage 2, × K̂, inverse stage 2, conjugate twiddles, and that
    half's share of the inverse stage 1 accumulated into y, so one half of the spectrum is in shared
    memory at a time. The twiddles live in shared memory (float32); the output goes out through the
    row's own input slot. transposed_g1: the inverse stage 1 reads F1's halves transposed (saves 32 KB of
    shared memory; the Pallas GPU interpreter cannot transpose, so tests there pass False).
    """
    rows, n = u.shape
    if not supports(n):
        raise ValueError(f"u: the prototype takes n in 1024, 2048, 4096, got {n}")
    r2 = 2 * n // R1
    ctas = min(ctas, -(-rows // wgs))
    f1c, twc, f2c, g1c = consts
    load, matmuls = _wgmma_helpers(r2, interpret)

    def body(u_ref, kh_ref, f1_ref, tw_ref, f2_ref, g1_ref, y_ref, x_s, f1_s, f2_s, tw_s, y1_s, *rest):
        if transposed_g1:
            const_bar, x_bar = rest
            g1 = lambda c, half: plgpu.transpose_ref(f1_s.at[c, half], (1, 0))  # noqa: E731
        else:
            g1_s, const_bar, x_bar = rest
            g1 = lambda c, half: g1_s.at[c, half]  # noqa: E731
        wg = lax.axis_index("wg")
        first = lax.axis_index("cta") * wgs + wg
        stride = ctas * wgs
        count = (rows - first + stride - 1) // stride

        def row_of(i):
            return first + i * stride

        pairs = [(f1_ref, f1_s), (tw_ref, tw_s), (f2_ref, f2_s)] + ([] if transposed_g1 else [(g1_ref, g1_s)])
        pl.when(wg == 0)(lambda: _copy_constants(pairs, const_bar))

        @pl.when(count > 0)
        def _():
            plgpu.copy_gmem_to_smem(u_ref.at[row_of(0)], x_s.at[wg, 0], x_bar.at[2 * wg])

        plgpu.barrier_wait(const_bar)
        y1 = y1_s.at[wg]

        @pl.loop(0, count)
        def _(i):
            row = row_of(i)
            slot = lax.rem(i, 2)

            @pl.when(i + 1 < count)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the other slot's output has left
                plgpu.copy_gmem_to_smem(u_ref.at[row_of(i + 1)], x_s.at[wg, 1 - slot], x_bar.at[2 * wg + 1 - slot])

            with jax.named_scope("wait_x"):
                plgpu.barrier_wait(x_bar.at[2 * wg + slot])
            x = x_s.at[wg, slot]
            channel = lax.rem(row, channels)

            def one_row(y_acc):
                for half in range(2):
                    with jax.named_scope("stage1"):
                        a_re, a_im = matmuls([(f1_s.at[0, half], x)], [(f1_s.at[1, half], x)])
                    with jax.named_scope("twiddle1"):
                        if "twiddle" in ablate:  # timing experiments only: wrong results
                            t_re, t_im = a_im, a_re
                        else:
                            t_re, t_im = load(tw_s.at[0, half]), load(tw_s.at[1, half])
                        _store_product(y1, a_re, a_im, t_re, t_im)
                        plgpu.commit_smem()
                    with jax.named_scope("stage2"):
                        if "stage2" in ablate:
                            z_re, z_im = t_re, t_im
                        else:
                            z_re, z_im = matmuls([(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[2])],
                                                 [(y1.at[0], f2_s.at[1]), (y1.at[1], f2_s.at[0])])
                    with jax.named_scope("khat"):
                        if "khat" in ablate:
                            k_re, k_im = z_im, z_re
                        else:
                            k_re = load(kh_ref.at[channel, 0, half], optimized=False)
                            k_im = load(kh_ref.at[channel, 1, half], optimized=False)
                        _store_product(y1, z_re, z_im, k_re, k_im)
                        plgpu.commit_smem()
                    with jax.named_scope("istage2"):
                        if "stage2" in ablate:
                            w_re, w_im = k_re, k_im
                        else:
                            w_re, w_im = matmuls([(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[1])],
                                                 [(y1.at[1], f2_s.at[0]), (y1.at[0], f2_s.at[2])])
                    with jax.named_scope("twiddle2"):
                        if "twiddle" not in ablate:
                            t_re, t_im = load(tw_s.at[0, half]), load(tw_s.at[1, half])
                        _store_product(y1, w_re, w_im, t_re, t_im, conj=True)
                        plgpu.commit_smem()
                    # this half's share of y; the next half's first matmuls wait for it before y1 is rewritten
                    plgpu.wgmma(y_acc, g1(0, half), y1.at[0])
                    plgpu.wgmma(y_acc, g1(1, half), y1.at[1])
                with jax.named_scope("istage1"):
                    return y_acc[...]

            y = pl.run_scoped(one_row, plgpu.ACC((HALF, r2), jnp.float32))
            with jax.named_scope("out"):
                x[...] = y.astype(jnp.bfloat16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(x, y_ref.at[row])

        plgpu.wait_smem_to_gmem(0)

    scratch = [_smem((wgs, 2, HALF, r2), r2), _smem((2, 2, HALF, HALF), r2), _smem((3, r2, r2), r2),
               _smem_f32((2, 2, HALF, r2), r2), _smem((wgs, 2, HALF, r2), r2)]
    if not transposed_g1:
        scratch.append(_smem((2, 2, HALF, HALF), r2))
    scratch += [plgpu.Barrier(num_arrivals=11 if transposed_g1 else 15), plgpu.Barrier(num_barriers=2 * wgs)]
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((rows, HALF, r2), u.dtype),
        grid=(ctas,), grid_names=("cta",), num_threads=wgs, thread_name="wg", scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(profile_space=(20 * -(-rows // (ctas * wgs)) + 16) if profile_dir else 0,
                                             profile_dir=profile_dir),
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), khat, f1c, twc, f2c, g1c).reshape(rows, n)


def _wgmma_helpers(r2, interpret):
    """(load, matmuls) for the kernels below; see long_conv_rows."""
    def load(ref, optimized=True):  # the GPU interpreter has no plgpu.load (and no layouts)
        if interpret is not None:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=optimized)

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
    """Rows per phase in `long_conv_grouped` that keep its accumulators in registers: 4 at N = 1K, 2 at 2K, 1 at 4K."""
    return {1024: 4, 2048: 2}.get(n, 1)


@functools.partial(jax.jit, static_argnames=("channels", "group", "ctas", "wgs", "interpret", "table_dtype",
                                             "p_in_registers"))
def long_conv_grouped(u, khat, consts, *, channels: int, group: int = 1, ctas: int = 132, wgs: int = 1,
                      interpret=None, table_dtype=jnp.float32, p_in_registers: bool = False):
    """`long_conv_rows` with `group` rows of one channel through every phase together.

    A warpgroup takes one channel at a time (its K̂ in shared memory) and its batch in blocks of `group`
    rows; each phase issues the wgmmas of all the block's rows before one wait, so the fixed cost of a
    phase (0.15–0.6 µs on an H200, NOTES.md) is paid once per block instead of once per row.
    u: [rows, n] bf16 with rows = batch · channels, batch divisible by group.
    table_dtype: the twiddles' and K̂'s type in shared memory (bfloat16 halves their 96 KB at N = 4K, which
    makes room for a second warpgroup, and adds ~2e-3 of relative error). p_in_registers: P = Z ⊙ K̂ is
    the inverse stage's A operand straight from registers instead of through shared memory (GPU only: the
    interpreter cannot).
    """
    rows, n = u.shape
    if not supports(n):
        raise ValueError(f"u: the prototype takes n in 1024, 2048, 4096, got {n}")
    batch = rows // channels
    if batch % group:
        raise ValueError(f"group: {group} must divide the batch {batch}")
    r2 = 2 * n // R1
    blocks = batch // group
    ctas = min(ctas, -(-channels // wgs))
    transposed_g1 = interpret is None
    p_in_registers = p_in_registers and interpret is None
    f1c, twc, f2c, g1c = consts
    twc, khat = twc.astype(table_dtype), khat.astype(table_dtype)
    table = _smem_f32 if table_dtype == jnp.float32 else _smem
    load, matmuls = _wgmma_helpers(r2, interpret)

    def body(u_ref, kh_ref, f1_ref, tw_ref, f2_ref, g1_ref, y_ref, x_s, f1_s, f2_s, tw_s, y1_s, kh_s, *rest):
        if transposed_g1:
            const_bar, x_bar, k_bar = rest
            g1 = lambda c, half: plgpu.transpose_ref(f1_s.at[c, half], (1, 0))  # noqa: E731
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
                for c in range(2):
                    for half in range(2):
                        plgpu.copy_gmem_to_smem(kh_ref.at[channel_of(i), c, half], kh_s.at[wg, c, half],
                                                k_bar.at[wg])

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
                    if half == 0:
                        pl.when(new_channel)(lambda: plgpu.barrier_wait(k_bar.at[wg]))
                    k_re, k_im = (load(kh_s.at[wg, c, half]).astype(jnp.float32) for c in range(2))
                    if p_in_registers:
                        ps = [((z_re * k_re - z_im * k_im).astype(jnp.bfloat16),
                               (z_re * k_im + z_im * k_re).astype(jnp.bfloat16))
                              for z_re, z_im in zip(z[:group], z[group:])]
                    else:
                        for y1, z_re, z_im in zip(y1s, z[:group], z[group:]):
                            _store_product(y1, z_re, z_im, k_re, k_im)
                        plgpu.commit_smem()
                        ps = [(y1.at[0], y1.at[1]) for y1 in y1s]
                    w = matmuls(*[[(p_re, f2_s.at[0]), (p_im, f2_s.at[1])] for p_re, p_im in ps],
                                *[[(p_im, f2_s.at[0]), (p_re, f2_s.at[2])] for p_re, p_im in ps])
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
               table((2, 2, HALF, r2), r2), _smem((wgs, group, 2, HALF, r2), r2), table((wgs, 2, 2, HALF, r2), r2)]
    if not transposed_g1:
        scratch.append(_smem((2, 2, HALF, HALF), r2))
    scratch += [plgpu.Barrier(num_arrivals=11 if transposed_g1 else 15),
                plgpu.Barrier(num_arrivals=group, num_barriers=2 * wgs), plgpu.Barrier(num_arrivals=4, num_barriers=wgs)]
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((rows, HALF, r2), u.dtype),
        grid=(ctas,), grid_names=("cta",), num_threads=wgs, thread_name="wg", scratch_types=scratch,
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), khat, f1c, twc, f2c, g1c).reshape(rows, n)


@functools.partial(jax.jit, static_argnames=("channels", "ctas", "wgs", "interpret"))
def spectrum_cotangent_rows(u, dy, consts, *, channels: int, ctas: int = 132, wgs: int = 2, interpret=None):
    """The cotangent of K̂ (kernel order, as `kernel_spectrum` lays it out) for y = long_conv_rows(u, K̂):
    Σ over the rows of a channel of (Re, −Im) of Û ⊙ conj(D̂), Û and D̂ the kernel-order spectra of u and dy.

    u, dy: [rows, n] bf16 (rows = batch · channels) -> [channels, re/im, half, 64, r2] float32.
    One unit of work is (channel, half of k1): the two halves of the forward transform are independent.
    """
    rows, n = u.shape
    r2 = 2 * n // R1
    batch = rows // channels
    units = 2 * channels
    ctas = min(ctas, -(-units // wgs))
    f1c, twc, f2c, _ = consts
    load, matmuls = _wgmma_helpers(r2, interpret)

    def body(u_ref, dy_ref, f1_ref, tw_ref, f2_ref, out_ref, x_s, f1_s, f2_s, y1_s, out_s, const_bar, x_bar):
        wg = lax.axis_index("wg")
        first = lax.axis_index("cta") * wgs + wg
        stride = ctas * wgs
        count = (units - first + stride - 1) // stride

        pl.when(wg == 0)(lambda: _copy_constants([(f1_ref, f1_s), (f2_ref, f2_s)], const_bar))

        plgpu.barrier_wait(const_bar)
        y1 = y1_s.at[wg]

        def transform(x, half, t_re, t_im):
            """The kernel-order spectrum's half of row x: (re, im) float32 [64, r2]."""
            a_re, a_im = matmuls([(f1_s.at[0, half], x)], [(f1_s.at[1, half], x)])
            _store_product(y1, a_re, a_im, t_re, t_im)
            plgpu.commit_smem()
            return matmuls([(y1.at[0], f2_s.at[0]), (y1.at[1], f2_s.at[2])],
                           [(y1.at[0], f2_s.at[1]), (y1.at[1], f2_s.at[0])])

        @pl.loop(0, count)
        def _(i):
            unit = first + i * stride
            channel, half = unit // 2, lax.rem(unit, 2)
            t_re, t_im = load(tw_ref.at[0, half], optimized=False), load(tw_ref.at[1, half], optimized=False)
            zero = jnp.zeros((HALF, r2), jnp.float32)
            if interpret is None:
                zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)

            def per_row(b, acc):
                row = b * channels + channel
                plgpu.copy_gmem_to_smem(u_ref.at[row], x_s.at[wg, 0], x_bar.at[wg])
                plgpu.copy_gmem_to_smem(dy_ref.at[row], x_s.at[wg, 1], x_bar.at[wg])
                plgpu.barrier_wait(x_bar.at[wg])
                u_re, u_im = transform(x_s.at[wg, 0], half, t_re, t_im)
                d_re, d_im = transform(x_s.at[wg, 1], half, t_re, t_im)
                return acc[0] + u_re * d_re + u_im * d_im, acc[1] + u_re * d_im - u_im * d_re

            acc_re, acc_im = lax.fori_loop(0, batch, per_row, (zero, zero))
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
        scratch_types=[_smem((wgs, 2, HALF, r2), r2), _smem((2, 2, HALF, HALF), r2), _smem((3, r2, r2), r2),
                       _smem((wgs, 2, HALF, r2), r2), plgpu.SMEM((wgs, 2, HALF, r2), jnp.float32),
                       plgpu.Barrier(num_arrivals=7), plgpu.Barrier(num_arrivals=2, num_barriers=wgs)],
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), dy.reshape(rows, HALF, r2), f1c, twc, f2c)


@functools.partial(jax.jit, static_argnames=("channels", "group", "ctas", "wgs", "interpret"))
def spectrum_cotangent_grouped(u, dy, consts, *, channels: int, group: int = 1, ctas: int = 132, wgs: int = 1,
                               interpret=None):
    """`spectrum_cotangent_rows` with the twiddles in shared memory, the next rows prefetched by TMA, and
    `group` batch elements (their u and dy rows) through each phase together, one wait per phase.

    u, dy: [rows, n] bf16 (rows = batch · channels, batch divisible by group) -> [channels, re/im, half, 64, r2]
    float32. A unit of work is (channel, half of k1); a warpgroup loops over its units and, in each, over
    the batch in blocks of `group`.
    """
    rows, n = u.shape
    if not supports(n):
        raise ValueError(f"u: the prototype takes n in 1024, 2048, 4096, got {n}")
    batch = rows // channels
    if batch % group:
        raise ValueError(f"group: {group} must divide the batch {batch}")
    r2 = 2 * n // R1
    blocks = batch // group
    units = 2 * channels
    ctas = min(ctas, -(-units // wgs))
    f1c, twc, f2c, _ = consts
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
                       _smem((3, r2, r2), r2), _smem_f32((2, 2, HALF, r2), r2),
                       _smem((wgs, 2 * group, 2, HALF, r2), r2), plgpu.SMEM((wgs, 2, HALF, r2), jnp.float32),
                       plgpu.Barrier(num_arrivals=11), plgpu.Barrier(num_arrivals=2 * group, num_barriers=2 * wgs)],
        interpret=interpret)
    return kernel(u.reshape(rows, HALF, r2), dy.reshape(rows, HALF, r2), f1c, twc, f2c)


def default_wgs(n: int) -> int:
    """Warpgroups per CTA of `long_conv_grouped` at its default group that fit shared memory."""
    return 1 if n >= 4096 else 2


def cotangent_config(n: int) -> tuple[int, int]:
    """(group, warpgroups) of `spectrum_cotangent_grouped` that fit shared memory and registers."""
    return {1024: (4, 2), 2048: (1, 2)}.get(n, (1, 1))


def long_conv_bhn(u, k, *, ctas: int = 132, wgs: int | None = None, group: int | None = None,
                  row_major: bool = False, spectrum=kernel_spectrum, interpret=None, **grouped_options):
    """Causal long conv in the [batch, channels, seq] layout. u: [B, H, N] bf16, k: [H, N] -> y [B, H, N] bf16.

    `long_conv_grouped` (group rows per phase; `default_group`) computes y and du, and
    `spectrum_cotangent_grouped` K̂'s cotangent; with row_major, `long_conv_rows` and `spectrum_cotangent_rows`
    (v3). du is the same kernel with conj(K̂); k's cotangent comes from XLA's transpose of `spectrum`.
    grouped_options (table_dtype, p_in_registers) go to `long_conv_grouped`."""
    batch, channels, n = u.shape
    consts = constants(n)
    if row_major:
        wgs = wgs or 2
        conv_rows = functools.partial(long_conv_rows, channels=channels, ctas=ctas, wgs=wgs, interpret=interpret,
                                      transposed_g1=interpret is None)
        cotangent = functools.partial(spectrum_cotangent_rows, wgs=min(wgs, 2))
    else:
        wgs = wgs or default_wgs(n)
        group = group or default_group(n)
        if batch % group:
            group = 1
        conv_rows = functools.partial(long_conv_grouped, channels=channels, group=group, ctas=ctas, wgs=wgs,
                                      interpret=interpret, **grouped_options)
        cotangent_group, cotangent_wgs = cotangent_config(n)
        cotangent = functools.partial(spectrum_cotangent_grouped, group=cotangent_group if batch % cotangent_group == 0
                                      else 1, wgs=cotangent_wgs)

    @jax.custom_vjp
    def conv(u_rows, khat):
        return conv_rows(u_rows, khat, consts)

    def conv_fwd(u_rows, khat):
        return conv(u_rows, khat), (u_rows, khat)

    def conv_bwd(residuals, dy):
        u_rows, khat = residuals
        du = conv_rows(dy, khat.at[:, 1].multiply(-1.0), consts)  # conj(K̂): the correlation with k
        return du, cotangent(u_rows, dy, consts, channels=channels, ctas=ctas, interpret=interpret)

    conv.defvjp(conv_fwd, conv_bwd)
    y = conv(u.reshape(batch * channels, n), spectrum(k, n))
    return y.reshape(batch, channels, n)


def reference_bhn(u, k):
    """The anchor's formula: irfft(rfft(u, 2N) · rfft(k, 2N))[:N] in float32."""
    n = u.shape[-1]
    spectrum = jnp.fft.rfft(u.astype(jnp.float32), 2 * n) * jnp.fft.rfft(k.astype(jnp.float32), 2 * n)
    return jnp.fft.irfft(spectrum, 2 * n)[..., :n].astype(u.dtype)


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
