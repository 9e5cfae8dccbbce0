"""The Hopper flash-attention forward prototype (experiments/hopper_attention/flash_forward.py), run by the Pallas
GPU interpreter on CPU against longseq's reference attention, and lowered for CUDA."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from longseq.ops import attention

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "experiments" / "hopper_attention"))
import flash_forward  # noqa: E402


def _inputs(batch, seq, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (batch, seq, h, head_dim), jnp.float32).astype(jnp.bfloat16)
                 for key, h in zip(keys, (heads, kv_heads, kv_heads)))


@pytest.mark.parametrize("causal, seq, block_kv, stages", [
    (False, 128, 64, 2),   # GQA, one tile, the ring refilled once
    (True, 256, 64, 3),    # two tiles: blocks unmasked, masked and skipped; three stages
])
def test_matches_the_reference(causal, seq, block_kv, stages):
    q, k, v = _inputs(1, seq, 2, 1, 64, seed=seq)
    out, lse = flash_forward.flash_forward(q, k, v, causal=causal, block_kv=block_kv, stages=stages,
                                           interpret=flash_forward.interpret_params())
    want_out, want_lse = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=causal, impl="reference")
    assert out.shape == q.shape and out.dtype == jnp.bfloat16 and lse.shape == (1, 2, seq)
    assert float(jnp.abs(out.astype(jnp.float32) - want_out).max()) < 2e-2
    assert float(jnp.abs(lse - want_lse).max()) < 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_for_cuda(causal):
    q = jax.ShapeDtypeStruct((2, 4096, 16, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 4096, 4, 128), jnp.bfloat16)
    forward = functools.partial(flash_forward.flash_forward, causal=causal)
    exported = jax.export.export(jax.jit(forward), platforms=["cuda"])(q, k, k)
    assert "mosaic_gpu" in exported.mlir_module()


def test_bad_input_is_refused():
    q, k, v = _inputs(1, 128, 2, 1, 64)
    with pytest.raises(ValueError, match="q_len must be a multiple of 128"):
        flash_forward.flash_forward(q[:, :64], k, v)
    with pytest.raises(ValueError, match="kv_heads 3 must divide heads 2"):
        flash_forward.flash_forward(q, *_inputs(1, 128, 3, 3, 64)[1:])
    with pytest.raises(ValueError, match="bfloat16"):
        flash_forward.flash_forward(q.astype(jnp.float32), k, v)
    with pytest.raises(ValueError, match="causal: needs q_len == kv_len"):
        flash_forward.flash_forward(q, *_inputs(1, 256, 2, 1, 64)[1:], causal=True)
