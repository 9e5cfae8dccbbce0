"""Depthwise long convolution of a sequence with a per-channel kernel as long as the sequence.

Shapes:

    u: [batch, seq, channels]        input
    k: [channels, kernel_len]        1 <= kernel_len <= seq
    y: [batch, seq, channels]        dtype of u, computed in float32 (float64 for float64 inputs)

causal=True: linear convolution, zero-padded, no wrap-around (k[c, l] = 0 for l >= kernel_len):

    y[b, t, c] = Σ_{s ≤ t} k[c, t − s] · u[b, s, c]

causal=False: circular convolution of length seq, with k zero-padded to seq:

    y[b, t, c] = Σ_s k[c, (t − s) mod seq] · u[b, s, c]

The FFT implementation costs O(seq log seq) per channel instead of O(seq²): the product of two
spectra of length n is the circular convolution of length n. For causal=True, choosing
n >= seq + kernel_len − 1 leaves no room for wrap-around, so the first seq outputs are exactly the
linear convolution. n is rounded up to the next 5-smooth number (2^a · 3^b · 5^c), which FFT
libraries handle with fast radix-2/3/5 passes and which wastes at most ~25% over the minimum,
against up to 100% for the next power of two. For causal=False, n = seq exactly (any length
works; FFT libraries handle prime lengths too, just with a worse constant).

The Monarch implementation writes the DFT as small dense matrices (matmuls), in
`long_conv_monarch.py` (plain JAX, any length), `long_conv_monarch_pallas.py` (one fused portable
kernel for padded lengths 512 … 8192, interpret mode off GPUs), `long_conv_monarch_hopper.py`
(Mosaic GPU kernels for Hopper: bf16, causal, seq 513 … 4096) and `long_conv_monarch_passes.py`
(three portable passes through HBM: bf16, causal, seq 4097 … 2^20).

`gated_long_conv(u, k, gate, skip)` is the H3 / Hyena block's gate ⊙ (long_conv(u, k) + skip ⊙ u): one
fused kernel with impl "monarch" where the fused kernel applies (the gate and skip read, and y written, in the
convolution's own pass), the same formula around `long_conv` otherwise.

The file reads: validation → direct reference → FFT implementation → public `long_conv`, which
dispatches on `impl`, and `gated_long_conv`:

    "fft"      jnp.fft (cuFFT / the platform's FFT)
    "monarch"  the Hopper kernels where they apply (on an H100 / H200), else (on GPUs, and in
               Pallas interpret mode on CPU) the passes for bf16 causal seq > 4096, else the fused
               portable kernel where it applies, else the Monarch matmuls as XLA ops (e.g. on TPUs,
               float32 past 8K, circular past 8K, learned butterflies)
    "auto"     "monarch" where its kernels were measured faster than cuFFT on a GPU (the Hopper
               kernels; the passes at an even batch and 8K < seq <= 128K:
               `long_conv_monarch_passes.faster_than_fft`), "fft" elsewhere (docs/long_conv.md)
    "direct"   the O(seq²) Toeplitz matrix (`long_conv_direct`): ground truth for tests
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LONG_CONV_IMPLS = ("auto", "fft", "monarch", "direct")

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Validation


def _check_long_conv_args(u, k) -> None:
    """Raise a ValueError naming the first argument that does not fit the shapes documented above."""
    if u.ndim != 3:
        raise ValueError(f"u: expected rank 3 [batch, seq, channels], got shape {u.shape}")
    if k.ndim != 2:
        raise ValueError(f"k: expected rank 2 [channels, kernel_len], got shape {k.shape}")
    for name, x in (("u", u), ("k", k)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    _, seq, channels = u.shape
    if seq < 1:
        raise ValueError(f"u: expected seq >= 1, got shape {u.shape}")
    if k.shape[0] != channels:
        raise ValueError(f"k: expected {channels} channels (from u), got shape {k.shape}")
    if not 1 <= k.shape[1] <= seq:
        raise ValueError(f"k: expected 1 <= kernel_len <= seq={seq}, got kernel_len={k.shape[1]}")


def _compute_dtype(u, k):
    return jnp.promote_types(jnp.promote_types(u.dtype, k.dtype), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Direct reference


def long_conv_direct(u: Array, k: Array, *, causal: bool = True) -> Array:
    """The same convolution as `long_conv`, by an explicit O(seq²) Toeplitz/circulant matrix.

    Used only by tests, as ground truth: it materialises a [channels, seq, seq] matrix.

    Args:
      u: [batch, seq, channels].
      k: [channels, kernel_len], 1 <= kernel_len <= seq.
      causal: linear (True) or circular (False) convolution, as in `long_conv`.

    Returns:
      y: [batch, seq, channels] in u's dtype.
    """
    u, k = jnp.asarray(u), jnp.asarray(k)
    _check_long_conv_args(u, k)
    seq = u.shape[1]
    acc = _compute_dtype(u, k)
    k_full = jnp.pad(k.astype(acc), ((0, 0), (0, seq - k.shape[1])))  # [channels, seq]
    lag = jnp.arange(seq)[:, None] - jnp.arange(seq)[None, :]  # lag[t, s] = t - s
    if causal:
        # Negative lags read from the future: zero. Clip so the gather index stays in range.
        matrix = jnp.where(lag >= 0, k_full[:, jnp.maximum(lag, 0)], 0.0)
    else:
        matrix = k_full[:, lag % seq]
    y = jnp.einsum("cts,bsc->btc", matrix, u.astype(acc), precision=jax.lax.Precision.HIGHEST)
    return y.astype(u.dtype)


# ----------------------------------------------------------------------------------------------
# FFT implementation


def fft_size(n: int) -> int:
    """The smallest 5-smooth number (2^a · 3^b · 5^c) that is >= n, for n >= 1."""
    best = 1 << max(n - 1, 0).bit_length()  # next power of two: always a candidate
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            candidate = power35
            while candidate < n:
                candidate *= 2
            best = min(best, candidate)
            power35 *= 3
        power5 *= 5
    return best


def _long_conv_fft(u: Array, k: Array, *, causal: bool) -> Array:
    """Convolution theorem with rfft. Arguments already validated."""
    seq = u.shape[1]
    n = fft_size(seq + k.shape[1] - 1) if causal else seq
    acc = _compute_dtype(u, k)
    # rfft zero-pads both signals to n. The kernel spectrum has no batch axis: it is computed once
    # and broadcast over the batch.
    k_hat = jnp.fft.rfft(k.astype(acc), n=n, axis=-1).T  # [n // 2 + 1, channels]
    u_hat = jnp.fft.rfft(u.astype(acc), n=n, axis=1)  # [batch, n // 2 + 1, channels]
    y = jnp.fft.irfft(u_hat * k_hat, n=n, axis=1)[:, :seq]
    return y.astype(u.dtype)


# ----------------------------------------------------------------------------------------------
# Monarch implementation (matmuls)


def _portable_kernels_interpret() -> bool | None:
    """How the portable Pallas Monarch kernels (the fused kernel, the passes) run here: compiled (False) on
    GPUs, interpreted (True) on CPUs, not at all (None) elsewhere (TPUs take the XLA matmuls)."""
    return {"gpu": False, "cpu": True}.get(jax.devices()[0].platform)


def _monarch_path(u: Array, k: Array, *, causal: bool) -> str:
    """Which Monarch implementation impl "monarch" runs: "hopper", "passes", "portable" (the fused portable
    kernel) or "xla" (the matmuls as XLA ops)."""
    from longseq.ops import long_conv_monarch_hopper as hopper
    from longseq.ops import long_conv_monarch_pallas as portable
    from longseq.ops import long_conv_monarch_passes as passes

    seq, kernel_len = u.shape[1], k.shape[1]
    if hopper.applies(seq, kernel_len, u.dtype, causal=causal) and hopper.on_hopper():
        return "hopper"
    if _portable_kernels_interpret() is None:
        return "xla"
    if passes.applies(seq, kernel_len, u.dtype, causal=causal):
        return "passes"
    return "portable" if portable.supports(seq, kernel_len, causal=causal) else "xla"


def _monarch_is_faster(u: Array, k: Array, *, causal: bool) -> bool:
    """Whether impl "auto" takes "monarch": where its kernels were measured faster than jnp.fft on a GPU."""
    from longseq.ops import long_conv_monarch_passes as passes

    path = _monarch_path(u, k, causal=causal)
    return path == "hopper" or (path == "passes" and jax.devices()[0].platform == "gpu"
                                and passes.faster_than_fft(u.shape[0], u.shape[1]))


def _long_conv_monarch(u: Array, k: Array, *, causal: bool, butterflies=None) -> Array:
    from longseq.ops import (long_conv_monarch, long_conv_monarch_hopper, long_conv_monarch_pallas,
                             long_conv_monarch_passes)

    path = "xla" if butterflies is not None else _monarch_path(u, k, causal=causal)
    if path == "hopper":
        return long_conv_monarch_hopper.long_conv_monarch_hopper(u, k)
    if path == "passes":
        return long_conv_monarch_passes.long_conv_monarch_passes(u, k, interpret=_portable_kernels_interpret())
    if path == "portable":
        return long_conv_monarch_pallas.long_conv_monarch_pallas(u, k, causal=causal,
                                                                 interpret=_portable_kernels_interpret())
    return long_conv_monarch.long_conv_monarch_xla(u, k, causal=causal, butterflies=butterflies)


# ----------------------------------------------------------------------------------------------
# Public entry point

_IMPLEMENTATIONS = {"fft": _long_conv_fft, "monarch": _long_conv_monarch,
                    "direct": lambda u, k, *, causal: long_conv_direct(u, k, causal=causal)}


def _resolve_impl(impl: str, u: Array, k: Array, *, causal: bool) -> str:
    if impl not in LONG_CONV_IMPLS:
        expected = ", ".join(repr(name) for name in LONG_CONV_IMPLS)
        raise ValueError(f"impl: expected one of {expected}, got {impl!r}")
    if impl == "auto":
        return "monarch" if _monarch_is_faster(u, k, causal=causal) else "fft"
    return impl


def long_conv(u: Array, k: Array, *, causal: bool = True, impl: str = "auto", butterflies=None) -> Array:
    """Depthwise long convolution of u with the per-channel kernels k.

    Args:
      u: [batch, seq, channels] input.
      k: [channels, kernel_len] kernels, 1 <= kernel_len <= seq.
      causal: True: linear convolution, y[b, t, c] = Σ_{s ≤ t} k[c, t − s] · u[b, s, c].
        False: circular convolution of length seq with k zero-padded to seq.
      impl: one of LONG_CONV_IMPLS; "auto" picks the fastest measured: "monarch" where the Hopper
        kernels apply (bf16, causal, 513 <= seq <= 4096 on an H100 / H200) and where the passes were
        faster on a GPU (bf16, causal, even batch, 8K < seq <= 128K), "fft" elsewhere.
      butterflies: (forward, inverse) `long_conv_monarch.Butterfly` factors replacing the exact DFT
        (a learned butterfly), causal only, with impl "monarch" or "auto"; their length must be
        at least seq + kernel_len − 1.

    Returns:
      y: [batch, seq, channels] in u's dtype (computed in float32, float64 for float64 inputs).
    """
    u, k = jnp.asarray(u), jnp.asarray(k)
    _check_long_conv_args(u, k)
    name = _resolve_impl(impl, u, k, causal=causal)
    if butterflies is not None:
        if impl not in ("auto", "monarch") or not causal:
            raise ValueError(f"butterflies: need impl 'monarch' or 'auto' and causal=True, got impl={impl!r}, "
                             f"causal={causal}")
        return _long_conv_monarch(u, k, causal=True, butterflies=butterflies)
    return _IMPLEMENTATIONS[name](u, k, causal=causal)


def gated_long_conv(u: Array, k: Array, gate: Array, skip: Array, *, causal: bool = True,
                    impl: str = "auto") -> Array:
    """gate ⊙ (long_conv(u, k) + skip ⊙ u), the gated block of H3 / Hyena with its skip term inside the gate.

    Args:
      u, k, causal, impl: as in `long_conv`.
      gate: [batch, seq, channels], like u.
      skip: [channels] (D).

    Returns:
      y: [batch, seq, channels] in u's dtype. With impl "monarch" and a length the fused portable kernel
      takes (`long_conv_monarch_pallas.gating_fuses`), one kernel computes it, forward and the convolution
      parts of the backward; otherwise (the Hopper kernels included) the formula runs around `long_conv`
      (computed in float32; XLA fuses it with the layout change around the Hopper kernels).
    """
    u, k, gate, skip = jnp.asarray(u), jnp.asarray(k), jnp.asarray(gate), jnp.asarray(skip)
    _check_long_conv_args(u, k)
    if gate.shape != u.shape:
        raise ValueError(f"gate: expected the shape of u {u.shape}, got {gate.shape}")
    if skip.shape != (u.shape[2],):
        raise ValueError(f"skip: expected shape ({u.shape[2]},) = [channels], got {skip.shape}")
    if (_resolve_impl(impl, u, k, causal=causal) == "monarch"
            and _monarch_path(u, k, causal=causal) == "portable"):
        from longseq.ops import long_conv_monarch_pallas as fused

        if fused.gating_fuses(u.shape[1], k.shape[1], u.shape[2], causal=causal):
            return fused.gated_long_conv_monarch_pallas(u, k, gate, skip, causal=causal,
                                                        interpret=_portable_kernels_interpret())
    z = long_conv(u, k, causal=causal, impl=impl).astype(jnp.float32)
    return (gate.astype(jnp.float32) * (z + skip.astype(jnp.float32) * u.astype(jnp.float32))).astype(u.dtype)
