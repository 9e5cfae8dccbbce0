"""The Monarch long convolution as one fused Pallas kernel per (batch, channel tile): the two-factor
DFT, the product with the kernel's spectrum and the inverse DFT, on-chip, with u and y read and
written once in their [batch, seq, channels] layout. Its plain-JAX twin is `long_conv_monarch_xla`.

One program: a tile of `block_c` channels of one batch element, u tile X: [rows, C] (rows = U1·L2,
the rows of the [L1, L2] view that are not zero padding), L = L1·L2:

    A  = F1[:, :U1] @ X.reshape(U1, L2·C)                     [L1, L2·C]    contract n1
    A' = A ⊙ T[:, :, None]                                    [L1, L2, C]   twiddles
    S  = A'.transpose(0, 2, 1).reshape(L1·C, L2) @ F2         [L1·C, L2]    contract n2 → spectrum
    P  = S ⊙ K̂                                                K̂: [L1, C, L2] (the layout of S)
    Q  = P @ G2  ⊙ T̄[:, None, :], transposed back             [L1, L2·C]    inverse, contract k2
    Y  = Re(G1[:O1] @ Q).reshape(O1·L2, C)                    [rows out, C] contract k1

(F = DFT matrices, G = conj(F)/size, T̄ = conj(T); all symmetric, so no transposes of matrices.)
Complex values are (re, im) pairs; matmul operands are bf16/fp16 for such inputs (float32
accumulation) and float32 otherwise.

The backward pass (custom_vjp, arguments u and the spectrum K̂ as (re, im)):
    du  = the same kernel on dy with conj(K̂)            (correlation with the kernel)
    dK̂  = (1/L) · Σ_b Û_b · conj(D̂_b), as (re, −im)      (one kernel, looping over the batch)
and K̂'s own gradient flows back to k through the XLA transform that made it.

Gated (`gated_long_conv_monarch_pallas`, the H3 / Hyena block's y = gate ⊙ (k ∗ u + D ⊙ u)): the same
program also reads the gate's tile and D, and writes y (and, when differentiated, z = k ∗ u for the
backward) in the same pass, so the gating costs no extra trip through memory. It needs the output rows
to be the input rows (causal, or circular without folding); its backward is the plain one on
dz = dy ⊙ gate plus elementwise terms.

Applies where the plan has two factors with L1 >= 32 and L2 >= 16 (Triton's matmul tiles need 16
rows and columns) and L <= 2^13; `supports` says so, and `long_conv(impl="monarch")` uses the XLA
path elsewhere. `interpret=True` runs it on CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from longseq.ops.long_conv_monarch import dft_butterflies, fold, kernel_spectrum, monarch_plan, operand_dtype_for

Array = jax.Array

MAX_LENGTH = 1 << 13  # past it the XLA Monarch path was as fast on an H100 (docs/long_conv.md)


class KernelPlan(NamedTuple):
    seq: int
    length: int
    l1: int
    l2: int
    in_rows1: int      # U1: rows of the [L1, L2] view read from u (the rest is zero padding)
    out_rows1: int     # O1: rows of the view written to y
    out_len: int
    fold: bool
    block_c: int
    num_warps: int


def kernel_factors(length: int) -> tuple[int, int]:
    """L = L1 · L2, L1 >= L2, both powers of two."""
    log2 = length.bit_length() - 1
    return 1 << (log2 - log2 // 2), 1 << (log2 // 2)


def supports(seq: int, kernel_len: int, *, causal: bool) -> bool:
    """Whether the fused kernel takes this convolution (else the XLA Monarch path does)."""
    length = monarch_plan(seq, kernel_len, causal=causal).length
    l1, l2 = kernel_factors(length)
    return l1 >= 32 and l2 >= 16 and length <= MAX_LENGTH


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def make_plan(seq: int, kernel_len: int, channels: int, *, causal: bool, block_c: int | None = None,
              num_warps: int = 8) -> KernelPlan:
    plan = monarch_plan(seq, kernel_len, causal=causal)
    l1, l2 = kernel_factors(plan.length)
    if block_c is None:  # the fastest on an H100 (docs/long_conv.md): L·C = 8192 complex values
        block_c = max(1, min(16, 8192 // plan.length))
    block_c = min(block_c, _next_power_of_2(channels))
    in_rows1 = min(l1, _next_power_of_2(-(-seq // l2)))
    out_rows1 = min(l1, _next_power_of_2(-(-plan.out_len // l2)))
    return KernelPlan(seq, plan.length, l1, l2, in_rows1, out_rows1, plan.out_len, plan.fold, block_c,
                      num_warps)


class _Factors(NamedTuple):
    f1: Array      # [2, L1, U1]  forward first factor, the columns read
    twiddle: Array  # [2, L1, L2]
    f2: Array      # [2, L2, L2]
    g2: Array      # [2, L2, L2]  inverse of f2 (conj / L2)
    twiddle_inv: Array  # [2, L1, L2]
    g1: Array      # [2, O1, L1]  inverse first factor, the rows written


def _factors(plan: KernelPlan) -> _Factors:
    forward, inverse = dft_butterflies((plan.l1, plan.l2))
    return _Factors(forward.matrices[0][:, :, :plan.in_rows1], forward.twiddles[0], forward.matrices[1],
                    inverse.matrices[1], inverse.twiddles[0], inverse.matrices[0][:, :plan.out_rows1])


# ----------------------------------------------------------------------------------------------
# In-kernel pieces (values, not refs)


def _pair(ref):
    """A factor's (re, im) from its [2, …] ref (loaded per half: Triton cannot slice values)."""
    return ref[0], ref[1]


def _dot(a, b, operand_dtype):
    precision = jax.lax.Precision.HIGHEST if operand_dtype == jnp.float32 else None
    return jnp.dot(a.astype(operand_dtype), b.astype(operand_dtype), precision=precision,
                   preferred_element_type=jnp.float32)


def _spectrum(x, f1, twiddle, f2, plan: KernelPlan, block_c: int, operand_dtype):
    """x: [U1·L2, C] real -> (re, im) [L1·C, L2], the transform in the kernel's layout."""
    l1, l2, u1 = plan.l1, plan.l2, plan.in_rows1
    x = x.reshape(u1, l2 * block_c)
    a_re = _dot(f1[0], x, operand_dtype).reshape(l1, l2, block_c)
    a_im = _dot(f1[1], x, operand_dtype).reshape(l1, l2, block_c)
    t_re, t_im = twiddle[0][:, :, None], twiddle[1][:, :, None]
    b_re = (a_re * t_re - a_im * t_im).transpose(0, 2, 1).reshape(l1 * block_c, l2)
    b_im = (a_re * t_im + a_im * t_re).transpose(0, 2, 1).reshape(l1 * block_c, l2)
    s_re = _dot(b_re, f2[0], operand_dtype) - _dot(b_im, f2[1], operand_dtype)
    s_im = _dot(b_re, f2[1], operand_dtype) + _dot(b_im, f2[0], operand_dtype)
    return s_re, s_im


def _inverse(p_re, p_im, g2, twiddle_inv, g1, plan: KernelPlan, block_c: int, operand_dtype):
    """(re, im) [L1·C, L2] -> the real output rows [O1·L2, C] float32."""
    l1, l2 = plan.l1, plan.l2
    q_re = (_dot(p_re, g2[0], operand_dtype) - _dot(p_im, g2[1], operand_dtype)).reshape(l1, block_c, l2)
    q_im = (_dot(p_re, g2[1], operand_dtype) + _dot(p_im, g2[0], operand_dtype)).reshape(l1, block_c, l2)
    t_re, t_im = twiddle_inv[0][:, None, :], twiddle_inv[1][:, None, :]
    r_re = (q_re * t_re - q_im * t_im).transpose(0, 2, 1).reshape(l1, l2 * block_c)
    r_im = (q_re * t_im + q_im * t_re).transpose(0, 2, 1).reshape(l1, l2 * block_c)
    y = _dot(g1[0], r_re, operand_dtype) - _dot(g1[1], r_im, operand_dtype)
    return y.reshape(plan.out_rows1 * l2, block_c)


def _conv_kernel(u_ref, k_re_ref, k_im_ref, f1_ref, tw_ref, f2_ref, g2_ref, twi_ref, g1_ref, y_ref, *,
                 plan: KernelPlan, operand_dtype):
    """u_ref: [U1·L2, C]; k_*_ref: [L1, C, L2]; y_ref: [O1·L2, C]."""
    c = plan.block_c
    s_re, s_im = _spectrum(u_ref[...], _pair(f1_ref), _pair(tw_ref), _pair(f2_ref), plan, c, operand_dtype)
    k_re = k_re_ref[...].reshape(plan.l1 * c, plan.l2)
    k_im = k_im_ref[...].reshape(plan.l1 * c, plan.l2)
    p_re, p_im = s_re * k_re - s_im * k_im, s_re * k_im + s_im * k_re
    y = _inverse(p_re, p_im, _pair(g2_ref), _pair(twi_ref), _pair(g1_ref), plan, c, operand_dtype)
    y_ref[...] = y.astype(y_ref.dtype)


def _gated_conv_kernel(u_ref, gate_ref, skip_ref, k_re_ref, k_im_ref, f1_ref, tw_ref, f2_ref, g2_ref, twi_ref,
                       g1_ref, y_ref, *z_ref, plan: KernelPlan, operand_dtype):
    """As `_conv_kernel` with y = gate ⊙ (z + skip ⊙ u), z = k ∗ u; gate_ref like u_ref, skip_ref: [1, C].
    z_ref (optional) receives z."""
    c = plan.block_c
    u = u_ref[...]
    s_re, s_im = _spectrum(u, _pair(f1_ref), _pair(tw_ref), _pair(f2_ref), plan, c, operand_dtype)
    k_re = k_re_ref[...].reshape(plan.l1 * c, plan.l2)
    k_im = k_im_ref[...].reshape(plan.l1 * c, plan.l2)
    p_re, p_im = s_re * k_re - s_im * k_im, s_re * k_im + s_im * k_re
    z = _inverse(p_re, p_im, _pair(g2_ref), _pair(twi_ref), _pair(g1_ref), plan, c, operand_dtype)
    skip = skip_ref[...].astype(jnp.float32)
    y_ref[...] = (gate_ref[...].astype(jnp.float32) * (z + skip * u.astype(jnp.float32))).astype(y_ref.dtype)
    if z_ref:
        z_ref[0][...] = z.astype(z_ref[0].dtype)


def _kernel_gradient_kernel(u_ref, dy_ref, f1_ref, tw_ref, f2_ref, dk_re_ref, dk_im_ref, *, plan: KernelPlan,
                            batch: int, operand_dtype):
    """u_ref, dy_ref: [batch, U1·L2, C]; outputs [L1, C, L2]: Σ_b Û_b conj(D̂_b) / L as (re, −im)."""
    c = plan.block_c
    f1, tw, f2 = _pair(f1_ref), _pair(tw_ref), _pair(f2_ref)

    def step(b, acc):
        u_re, u_im = _spectrum(u_ref[b], f1, tw, f2, plan, c, operand_dtype)
        d_re, d_im = _spectrum(dy_ref[b], f1, tw, f2, plan, c, operand_dtype)
        return acc[0] + (u_re * d_re + u_im * d_im), acc[1] + (u_im * d_re - u_re * d_im)

    zeros = jnp.zeros((plan.l1 * c, plan.l2), jnp.float32)
    acc_re, acc_im = jax.lax.fori_loop(0, batch, step, (zeros, zeros))
    dk_re_ref[...] = (acc_re / plan.length).reshape(plan.l1, c, plan.l2)
    dk_im_ref[...] = (-acc_im / plan.length).reshape(plan.l1, c, plan.l2)


# ----------------------------------------------------------------------------------------------
# pallas_calls on padded arrays


def _compiler_params(plan: KernelPlan, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1)


def _factor_specs(factors: _Factors, grid_rank: int):
    zero = (lambda *_: (0, 0, 0))
    del grid_rank
    return [pl.BlockSpec(f.shape, zero) for f in factors]


def _conv_call(u, k_re, k_im, plan: KernelPlan, *, interpret: bool):
    """u: [B, U1·L2, Cp]; k_*: [L1, Cp, L2] -> y [B, O1·L2, Cp] in u's dtype."""
    batch, rows, channels = u.shape
    c, factors = plan.block_c, _factors(plan)
    grid = (batch, channels // c)
    kernel = functools.partial(_conv_kernel, plan=plan, operand_dtype=operand_dtype_for(u.dtype))
    k_spec = pl.BlockSpec((plan.l1, c, plan.l2), lambda b, j: (0, j, 0))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((None, rows, c), lambda b, j: (b, 0, j)), k_spec, k_spec,
                  *_factor_specs(factors, 2)],
        out_specs=pl.BlockSpec((None, plan.out_rows1 * plan.l2, c), lambda b, j: (b, 0, j)),
        out_shape=jax.ShapeDtypeStruct((batch, plan.out_rows1 * plan.l2, channels), u.dtype),
        compiler_params=_compiler_params(plan, interpret),
        interpret=interpret,
    )(u, k_re, k_im, *factors)


def _gated_conv_call(u, gate, skip, k_re, k_im, plan: KernelPlan, *, with_z: bool, interpret: bool):
    """u, gate: [B, U1·L2, Cp] (U1 = O1); skip: [1, Cp]; k_*: [L1, Cp, L2] -> y (and z) [B, U1·L2, Cp]."""
    batch, rows, channels = u.shape
    c, factors = plan.block_c, _factors(plan)
    kernel = functools.partial(_gated_conv_kernel, plan=plan, operand_dtype=operand_dtype_for(u.dtype))
    tokens = pl.BlockSpec((None, rows, c), lambda b, j: (b, 0, j))
    k_spec = pl.BlockSpec((plan.l1, c, plan.l2), lambda b, j: (0, j, 0))
    shape = jax.ShapeDtypeStruct((batch, rows, channels), u.dtype)
    return pl.pallas_call(
        kernel,
        grid=(batch, channels // c),
        in_specs=[tokens, tokens, pl.BlockSpec((1, c), lambda b, j: (0, j)), k_spec, k_spec,
                  *_factor_specs(factors, 2)],
        out_specs=[tokens, tokens] if with_z else [tokens],
        out_shape=[shape, shape] if with_z else [shape],
        compiler_params=_compiler_params(plan, interpret),
        interpret=interpret,
    )(u, gate, skip, k_re, k_im, *factors)


def _kernel_gradient_call(u, dy, plan: KernelPlan, *, interpret: bool):
    """u, dy: [B, U1·L2, Cp] -> (re, im) of dK̂, each [L1, Cp, L2] float32."""
    batch, rows, channels = u.shape
    c, factors = plan.block_c, _factors(plan)
    kernel = functools.partial(_kernel_gradient_kernel, plan=plan, batch=batch,
                               operand_dtype=operand_dtype_for(u.dtype))
    tokens = pl.BlockSpec((batch, rows, c), lambda j: (0, 0, j))
    out = pl.BlockSpec((plan.l1, c, plan.l2), lambda j: (0, j, 0))
    shape = jax.ShapeDtypeStruct((plan.l1, channels, plan.l2), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid=(channels // c,),
        in_specs=[tokens, tokens, *_factor_specs(factors[:3], 1)],
        out_specs=[out, out],
        out_shape=[shape, shape],
        compiler_params=_compiler_params(plan, interpret),
        interpret=interpret,
    )(u, dy, *factors[:3])


# ----------------------------------------------------------------------------------------------
# Differentiable op on (u, K̂)


def _pad_rows_channels(x, rows: int, channels: int):
    pad = ((0, 0), (0, rows - x.shape[1]), (0, channels - x.shape[2]))
    return x if all(p == (0, 0) for p in pad) else jnp.pad(x, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_with_spectrum(u, k_re, k_im, plan: KernelPlan, interpret: bool):
    """u: [B, seq, C]; k_*: [L1, Cp, L2] -> the linear (unfolded) output rows [B, out_len, C]."""
    return _conv_with_spectrum_forward(u, k_re, k_im, plan, interpret)[0]


def _conv_with_spectrum_forward(u, k_re, k_im, plan, interpret):
    channels = k_re.shape[1]
    u_pad = _pad_rows_channels(u, plan.in_rows1 * plan.l2, channels)
    y = _conv_call(u_pad, k_re, k_im, plan, interpret=interpret)
    return y[:, :plan.out_len, :u.shape[2]], (u_pad, k_re, k_im)


def _conv_with_spectrum_backward(plan, interpret, residuals, dy):
    u_pad, k_re, k_im = residuals
    channels = u_pad.shape[2]
    # The correlation reads dy's rows as a signal of length out_len; its outputs are u's rows.
    dy_plan = plan._replace(in_rows1=plan.out_rows1, out_rows1=plan.in_rows1)
    dy_pad = _pad_rows_channels(dy.astype(u_pad.dtype), plan.out_rows1 * plan.l2, channels)
    du = _conv_call(dy_pad, k_re, -k_im, dy_plan, interpret=interpret)[:, :plan.seq, :dy.shape[2]]
    if plan.in_rows1 != plan.out_rows1:  # the gradient kernel reads u and dy as equally long views
        rows = max(plan.in_rows1, plan.out_rows1) * plan.l2
        grad_plan = plan._replace(in_rows1=rows // plan.l2)
        u_pad, dy_pad = _pad_rows_channels(u_pad, rows, channels), _pad_rows_channels(dy_pad, rows, channels)
    else:
        grad_plan = plan
    dk_re, dk_im = _kernel_gradient_call(u_pad, dy_pad, grad_plan, interpret=interpret)
    return du.astype(u_pad.dtype), dk_re, dk_im


_conv_with_spectrum.defvjp(_conv_with_spectrum_forward, _conv_with_spectrum_backward)


def long_conv_monarch_pallas(u: Array, k: Array, *, causal: bool, interpret: bool = False,
                             block_c: int | None = None, num_warps: int = 8) -> Array:
    """`long_conv` through the fused kernel (arguments validated; `supports` true)."""
    _, seq, channels = u.shape
    plan = make_plan(seq, k.shape[1], channels, causal=causal, block_c=block_c, num_warps=num_warps)
    monarch = monarch_plan(seq, k.shape[1], causal=causal)
    k_re, k_im = _spectrum_in_kernel_layout(k, plan, monarch, channels, operand_dtype_for(u.dtype))
    z = _conv_with_spectrum(u, k_re, k_im, plan, interpret)
    return fold(z, monarch).astype(u.dtype)


def gating_fuses(seq: int, kernel_len: int, channels: int, *, causal: bool) -> bool:
    """Whether `gated_long_conv_monarch_pallas` runs as one kernel: the fused kernel applies and its
    output rows are its input rows (no circular fold)."""
    if not supports(seq, kernel_len, causal=causal):
        return False
    plan = make_plan(seq, kernel_len, channels, causal=causal)
    return not plan.fold and plan.in_rows1 == plan.out_rows1


def _gated_padded(u, gate, skip, k_re, k_im, plan: KernelPlan, *, with_z: bool, interpret: bool):
    """The gated kernel on u, gate padded to the plan's rows and the tile's channels: (u_pad, y[, z])."""
    channels, rows = k_re.shape[1], plan.in_rows1 * plan.l2
    u_pad, gate_pad = (_pad_rows_channels(x, rows, channels) for x in (u, gate))
    skip_row = jnp.pad(skip, (0, channels - skip.shape[0]))[None]
    return u_pad, *_gated_conv_call(u_pad, gate_pad, skip_row, k_re, k_im, plan, with_z=with_z, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gated_conv_with_spectrum(u, gate, skip, k_re, k_im, plan: KernelPlan, interpret: bool):
    """u, gate: [B, seq, C]; skip: [C]; k_*: [L1, Cp, L2] -> gate ⊙ (k ∗ u + skip ⊙ u) [B, seq, C]."""
    _, y = _gated_padded(u, gate, skip, k_re, k_im, plan, with_z=False, interpret=interpret)
    return y[:, :plan.seq, :u.shape[2]]


def _gated_forward(u, gate, skip, k_re, k_im, plan, interpret):
    """As `_gated_conv_with_spectrum`, also writing z = k ∗ u for the backward."""
    u_pad, y, z = _gated_padded(u, gate, skip, k_re, k_im, plan, with_z=True, interpret=interpret)
    seq, c = plan.seq, u.shape[2]
    return y[:, :seq, :c], (u_pad, gate, skip, z[:, :seq, :c], k_re, k_im)


def _gated_backward(plan, interpret, residuals, dy):
    """y = gate ⊙ t, t = z + skip ⊙ u, z = k ∗ u: dgate = dy ⊙ t, dt = dy ⊙ gate, dskip = Σ dt ⊙ u,
    du = (correlation of dt with k) + skip ⊙ dt, dK̂ from u and dt, as the plain kernel's backward."""
    u_pad, gate, skip, z, k_re, k_im = residuals
    seq, c = plan.seq, gate.shape[2]
    u = u_pad[:, :seq, :c].astype(jnp.float32)
    dy32, gate32 = dy.astype(jnp.float32), gate.astype(jnp.float32)
    dt = dy32 * gate32
    dgate = dy32 * (z.astype(jnp.float32) + skip.astype(jnp.float32) * u)
    dskip = jnp.sum(dt * u, axis=(0, 1))
    du_conv, dk_re, dk_im = _conv_with_spectrum_backward(plan, interpret, (u_pad, k_re, k_im), dt.astype(gate.dtype))
    du = du_conv.astype(jnp.float32) + skip.astype(jnp.float32) * dt
    return du.astype(u_pad.dtype), dgate.astype(gate.dtype), dskip.astype(skip.dtype), dk_re, dk_im


_gated_conv_with_spectrum.defvjp(_gated_forward, _gated_backward)


def _spectrum_in_kernel_layout(k, plan: KernelPlan, monarch, channels: int, operand_dtype):
    """k [C, kernel_len] -> its spectrum's (re, im), each [L1, Cp, L2] (channels padded to the tile)."""
    forward, _ = dft_butterflies((plan.l1, plan.l2))
    k = jnp.pad(k, ((0, 0), (0, monarch.kernel_len - k.shape[1])))
    k_re, k_im = kernel_spectrum(k, monarch, forward, operand_dtype=operand_dtype)  # [L, C]
    padded_channels = -(-channels // plan.block_c) * plan.block_c

    def kernel_layout(x):  # [L, C] in [k1, k2] order -> [L1, Cp, L2]
        x = jnp.pad(x, ((0, 0), (0, padded_channels - channels)))
        return x.reshape(plan.l1, plan.l2, padded_channels).transpose(0, 2, 1)

    return kernel_layout(k_re), kernel_layout(k_im)


def gated_long_conv_monarch_pallas(u: Array, k: Array, gate: Array, skip: Array, *, causal: bool,
                                   interpret: bool = False, block_c: int | None = None,
                                   num_warps: int = 8) -> Array:
    """gate ⊙ (long_conv(u, k) + skip ⊙ u) in one kernel (arguments validated; `gating_fuses` true)."""
    _, seq, channels = u.shape
    plan = make_plan(seq, k.shape[1], channels, causal=causal, block_c=block_c, num_warps=num_warps)
    monarch = monarch_plan(seq, k.shape[1], causal=causal)
    k_re, k_im = _spectrum_in_kernel_layout(k, plan, monarch, channels, operand_dtype_for(u.dtype))
    return _gated_conv_with_spectrum(u, gate, skip, k_re, k_im, plan, interpret).astype(u.dtype)
