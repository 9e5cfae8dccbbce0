"""The Hopper flash-attention kernels (impl="pallas_mosaic_gpu", longseq.ops.attention_hopper) against the
reference, forward and gradients, bf16 inputs against the float32 reference on the same (rounded) values.

On a Hopper GPU the portable kernel's cases (tests/ops/test_attention_pallas.py: causal and not, GQA and MQA,
offsets, windows, segment ids, odd lengths, rows that see no key) run compiled, at head_dim 64 and 128. On CPU
the Pallas GPU interpreter runs the kernels' own code (barriers, TMA copies, masks, softmax) on a few cases
with the products as jnp.dot, `jax.export` checks the CUDA lowering and shared memory, and the dispatch's
choices and errors are checked.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.config import Config, ConfigError, from_dict
from longseq.ops import attention, attention_backward, merge_partials
from longseq.ops import attention_hopper, mosaic_gpu

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_attention_pallas import CASES, outputs_and_grads, random_inputs, relative_error  # noqa: E402

attention_module = importlib.import_module("longseq.ops.attention")  # the module, not the function
ON_HOPPER = mosaic_gpu.on_hopper()
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernels need a Hopper GPU")


def assert_close_bf16(got, want, what=""):
    """bf16 tolerances: outputs and gradients within 2% (relative norm), lse within 2e-2, -inf where the
    reference has it."""
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = got, want
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite, err_msg=f"{what}: lse -inf rows")
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, lse_ref, 0), atol=2e-2, err_msg=what)
    assert np.all(np.isfinite(np.asarray(out, np.float32))), f"{what}: unwritten or NaN output"
    assert relative_error(out, out_ref) < 1e-2, what
    for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
        assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32))), f"{what}: d{arg}"
        assert relative_error(grad, grad_ref) < 2e-2, f"{what}: d{arg}"


def run_case(name, head_dim, seed):
    q_len, kv_len, heads, kv_heads, _, causal, window, segments, q_off, kv_off = CASES[name]
    qkv, weights, segment_ids = random_inputs(seed, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                              head_dim=head_dim, dtype=jnp.bfloat16, segments=segments)
    kwargs = dict(causal=causal, window=window, segment_ids=segment_ids, q_offset=q_off, kv_offset=kv_off)
    got = outputs_and_grads(qkv, weights, impl="pallas_mosaic_gpu", **kwargs)
    want = outputs_and_grads(tuple(x.astype(jnp.float32) for x in qkv), weights, impl="reference", **kwargs)
    return got, want


# ----------------------------------------------------------------------------------------------
# On a Hopper GPU: the portable kernel's suite


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_on_the_portable_kernels_cases(name, head_dim):
    got, want = run_case(name, head_dim, seed=hash(name) % 1000)
    assert_close_bf16(got, want, name)


@needs_hopper
def test_empty_rows_have_zero_output_and_gradient():
    (out, lse, grads), _ = run_case("empty_rows", 64, seed=3)
    np.testing.assert_array_equal(np.asarray(out[:, :20], np.float32), 0.0)  # causal, kv_offset 20
    assert np.all(lse[:, :, :20] == -np.inf) and np.all(np.isfinite(lse[:, :, 20:]))
    np.testing.assert_array_equal(np.asarray(grads[0][:, :20], np.float32), 0.0)


@needs_hopper
def test_long_sequences_traced_offsets_and_merged_halves():
    """2K keys in two halves under jit with traced offsets, merged through lse (the sequence-parallel building
    block, lse's cotangent included), against one call on all keys and against the reference."""
    qkv, (w_out, _), _ = random_inputs(5, batch=1, q_len=1000, kv_len=2048, heads=4, kv_heads=2, head_dim=128,
                                       dtype=jnp.bfloat16)
    kwargs = dict(causal=True, impl="pallas_mosaic_gpu")

    def merged(q, k, v, q_offset):
        half = k.shape[1] // 2
        parts = [attention(q, k[:, s:s + half], v[:, s:s + half], q_offset=q_offset, kv_offset=s, **kwargs)
                 for s in (0, half)]
        return merge_partials([p[0] for p in parts], [p[1] for p in parts])

    def full(q, k, v, q_offset, impl="pallas_mosaic_gpu"):
        return attention(q, k, v, causal=True, q_offset=q_offset, impl=impl)

    def loss(fn):
        return lambda q, k, v, q_offset: jnp.sum(fn(q, k, v, q_offset)[0].astype(jnp.float32) * w_out)

    offset = jnp.int32(1048)
    qkv32 = tuple(x.astype(jnp.float32) for x in qkv)
    ref = functools.partial(full, impl="reference")
    for fn in (merged, full):
        grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(*qkv, offset)
        grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(*qkv32, offset)
        for grad, grad_ref, arg in zip(grads, grads_ref, "qkv"):
            assert relative_error(grad, grad_ref) < 2e-2, f"{fn.__name__}: d{arg}"
        assert relative_error(jax.jit(fn)(*qkv, offset)[0], ref(*qkv32, offset)[0]) < 1e-2


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_long_rows_take_192_key_blocks_and_match_the_reference(causal):
    """Past LONG_KV keys the forward streams 192-key blocks: an odd key count (a masked tail), GQA, forward and
    gradients against the reference."""
    kv_len = attention_hopper.LONG_KV[causal] + 77
    assert attention_hopper.block_kv_for(kv_len, causal=causal, segmented=False, window=None) == 192
    qkv, weights, _ = random_inputs(11, batch=1, q_len=300, kv_len=kv_len, heads=4, kv_heads=2, head_dim=128,
                                    dtype=jnp.bfloat16)
    options = dict(causal=causal, q_offset=kv_len - 300)   # causal: the queries are the last 300 positions
    got = outputs_and_grads(qkv, weights, impl="pallas_mosaic_gpu", **options)
    want = outputs_and_grads(tuple(x.astype(jnp.float32) for x in qkv), weights, impl="reference", **options)
    assert_close_bf16(got, want, f"192-key blocks, causal={causal}")


def test_the_forward_takes_192_key_blocks_only_on_long_rows_without_segments_or_a_window():
    choose = attention_hopper.block_kv_for
    for causal in (False, True):
        long = attention_hopper.LONG_KV[causal]
        assert choose(long, causal=causal, segmented=False, window=None) == 192
        assert choose(long - 1, causal=causal, segmented=False, window=None) == 128
        assert choose(long, causal=causal, segmented=True, window=None) == 128   # its buffers would not fit
        assert choose(long, causal=causal, segmented=False, window=512) == 128
    assert attention_hopper.LONG_KV[True] > attention_hopper.LONG_KV[False]


@pytest.mark.skipif(ON_HOPPER, reason="the interpreter stands in for the GPU")
def test_interpreter_forward_with_192_key_blocks():
    """The ring of 192-key blocks (it wraps; the tail block is masked), causal so that the warpgroups of a tile
    see different blocks, against the reference."""
    qkv, _, _ = random_inputs(4, batch=1, q_len=200, kv_len=700, heads=2, kv_heads=1, head_dim=64,
                              dtype=jnp.bfloat16)
    options = dict(causal=True, q_offset=350, kv_offset=100)
    out, lse = attention_hopper.flash_forward(*qkv, block_kv=192, interpret=mosaic_gpu.interpret_params(),
                                              **options)
    want, want_lse = attention(*(x.astype(jnp.float32) for x in qkv), impl="reference", **options)
    np.testing.assert_allclose(lse, want_lse, atol=2e-2)
    assert relative_error(out, want) < 1e-2


@needs_hopper
def test_a_scanned_layer_runs_the_forward_kernel_once():
    """One forward and one backward kernel in the compiled gradient of a scan of 3 layers (a matmul, then
    attention). Without `computed_once`, XLA's dynamic-slice fusion copied the forward kernel into the fusion
    that stacks the scan's saved outputs, so it ran twice per layer (jax 0.11.2)."""
    (q, _, _), _, _ = random_inputs(6, batch=2, q_len=1024, kv_len=1024, heads=2, kv_heads=2, head_dim=128,
                                    dtype=jnp.bfloat16)
    weights = jax.random.normal(jax.random.key(1), (3, 128, 128), jnp.bfloat16) / 16

    def loss(q, weights):
        def layer(h, w):
            x = h @ w
            return attention(x, x, x, causal=True, impl="pallas_mosaic_gpu")[0], None
        return jnp.sum(jax.lax.scan(layer, q, weights)[0].astype(jnp.float32))
    hlo = jax.jit(jax.grad(loss, argnums=1)).lower(q, weights).compile().as_text()
    assert hlo.count('custom_call_target="mosaic_gpu') == 2


@needs_hopper
def test_backward_from_statistics_matches_the_reference():
    qkv, _, segment_ids = random_inputs(9, q_len=300, kv_len=260, heads=4, kv_heads=1, head_dim=128,
                                        dtype=jnp.bfloat16, segments=3)
    options = dict(causal=True, q_offset=30, segment_ids=segment_ids)
    out, lse = attention(*qkv, impl="reference", **options)
    dout = jax.random.normal(jax.random.key(0), out.shape, jnp.float32).astype(jnp.bfloat16)
    got = attention_backward(*qkv, out.astype(jnp.bfloat16), lse, dout, impl="pallas_mosaic_gpu", **options)
    want = attention_backward(*(x.astype(jnp.float32) for x in qkv), out, lse, dout.astype(jnp.float32),
                              impl="reference", **options)
    for g, w, arg in zip(got, want, "qkv"):
        assert g.dtype == jnp.bfloat16 and relative_error(g, w) < 2e-2, f"d{arg}"


# ----------------------------------------------------------------------------------------------
# On CPU: the Pallas GPU interpreter, the CUDA lowering, the dispatch


def _interpreted(name, head_dim, seed=1):
    """A case of CASES through `attention(impl="pallas_mosaic_gpu", interpret=True)` and the reference, with 2 query
    heads over 1 kv head (the interpreter simulates every thread of every CTA: fewer heads, less CI time)."""
    q_len, kv_len, _, _, _, causal, window, segments, q_off, kv_off = CASES[name]
    heads, kv_heads = 2, 1
    qkv, weights, segment_ids = random_inputs(seed, batch=1, q_len=q_len, kv_len=kv_len, heads=heads,
                                              kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.bfloat16,
                                              segments=segments)
    kwargs = dict(causal=causal, window=window, segment_ids=segment_ids, q_offset=jnp.int32(q_off),
                  kv_offset=jnp.int32(kv_off))

    @functools.partial(jax.jit, static_argnums=(0, 1))  # one compiled call: op by op, the interpreter is slower
    def run(impl, interpret, *qkv):
        def loss(q, k, v):
            out, lse = attention(q, k, v, impl=impl, interpret=interpret, **kwargs)
            lse_term = jnp.where(jnp.isfinite(lse), lse * weights[1], 0.0)
            return jnp.sum(out.astype(jnp.float32) * weights[0]) + jnp.sum(lse_term), (out, lse)
        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*qkv)
        return out, lse, grads
    got = run("pallas_mosaic_gpu", True, *qkv)
    want = run("reference", None, *(x.astype(jnp.float32) for x in qkv))
    return got, want


@pytest.mark.skipif(ON_HOPPER, reason="the interpreter stands in for the GPU")
@pytest.mark.parametrize("name, head_dim", [
    ("causal_offsets_gqa4_cross", 64),       # blocks skipped, masked and whole; traced offsets; MQA
    ("window_causal_segments_offset", 64),   # a causal window over packed sequences: every seen block masked
    ("causal_odd_gqa2", 128),                # dQ's columns split between the warpgroups; odd tails
])
def test_interpreter_matches_reference(name, head_dim):
    got, want = _interpreted(name, head_dim)
    assert_close_bf16(got, want, name)


@pytest.mark.skipif(ON_HOPPER, reason="the interpreter stands in for the GPU")
def test_interpreter_forward_over_many_key_blocks():
    """600 keys: five blocks of 128 through a ring of two slots (it wraps twice); the warpgroups of a tile see
    different numbers of blocks (causal, queries from position 350, keys from 400), some none at all."""
    qkv, _, _ = random_inputs(4, batch=1, q_len=200, kv_len=600, heads=2, kv_heads=1, head_dim=64,
                              dtype=jnp.bfloat16)
    options = dict(causal=True, q_offset=350, kv_offset=400)
    out, lse = attention(*qkv, impl="pallas_mosaic_gpu", interpret=True, **options)
    want, want_lse = attention(*(x.astype(jnp.float32) for x in qkv), impl="reference", **options)
    finite = np.isfinite(want_lse)
    assert 0 < finite.sum() < finite.size
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(np.where(finite, lse, 0), np.where(finite, want_lse, 0), atol=2e-2)
    assert relative_error(out, want) < 1e-2


@pytest.mark.skipif(ON_HOPPER, reason="the interpreter stands in for the GPU")
def test_interpreter_backward_from_statistics_matches_the_reference():
    qkv, _, _ = random_inputs(9, batch=1, q_len=70, kv_len=90, heads=2, kv_heads=1, head_dim=64,
                              dtype=jnp.bfloat16)
    options = dict(causal=True, q_offset=30, window=50)
    out, lse = attention(*qkv, impl="reference", **options)
    dout = jax.random.normal(jax.random.key(0), out.shape, jnp.float32).astype(jnp.bfloat16)
    got = attention_backward(*qkv, out.astype(jnp.bfloat16), lse, dout, impl="pallas_mosaic_gpu",
                             interpret=True, **options)
    want = attention_backward(*(x.astype(jnp.float32) for x in qkv), out, lse, dout.astype(jnp.float32),
                              impl="reference", **options)
    for g, w, arg in zip(got, want, "qkv"):
        assert g.dtype == jnp.bfloat16 and relative_error(g, w) < 2e-2, f"d{arg}"


@pytest.mark.parametrize("causal", [False, True])
def test_lowers_for_cuda_within_shared_memory(causal):
    q = jax.ShapeDtypeStruct((2, 4096, 16, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 4096, 4, 128), jnp.bfloat16)
    forward = functools.partial(attention_hopper.flash_forward, causal=causal)
    long_k = jax.ShapeDtypeStruct((2, attention_hopper.LONG_KV[causal], 4, 128), jnp.bfloat16)  # 192-key blocks
    for keys in (k, long_k):
        assert "mosaic_gpu" in jax.export.export(jax.jit(forward), platforms=["cuda"])(q, keys, keys).mlir_module()
    ids = (jnp.zeros((2, 4096), jnp.int32),) * 2 if causal else None  # segment ids and a window with causal
    window = 1024 if causal else None

    def loss(q, k, v):
        return jnp.sum(attention_hopper.hopper_attention(q, k, v, causal=causal, segment_ids=ids, window=window)[0])
    grad = jax.grad(loss, (0, 1, 2))
    assert jax.export.export(jax.jit(grad), platforms=["cuda"])(q, k, k).mlir_module().count("mosaic_gpu") >= 2


@pytest.mark.skipif(ON_HOPPER, reason="checks the CPU's answers")
def test_off_hopper_it_is_not_chosen_and_asking_for_it_is_a_clear_error():
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    assert attention_module._resolve_impl("auto", q, None) != "pallas_mosaic_gpu"
    with pytest.raises(ValueError, match="impl: 'pallas_mosaic_gpu' runs on Hopper GPUs .* use impl='pallas'"):
        attention(q, q, q, impl="pallas_mosaic_gpu")
    with pytest.raises(ValueError, match="q: impl='pallas_mosaic_gpu' takes bfloat16, got float32"):
        attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32), impl="pallas_mosaic_gpu",
                  interpret=True)
    with pytest.raises(ValueError, match="q: impl='pallas_mosaic_gpu' takes head_dim 64 or 128, got 32"):
        attention(q[..., :32], q[..., :32], q[..., :32], impl="pallas_mosaic_gpu", interpret=True)
    with pytest.raises(ConfigError, match="kernels.attention: pallas_mosaic_gpu takes model.compute_dtype bfloat16"):
        from_dict(Config, {"model": {"mixer": "attention"}, "kernels": {"attention": "pallas_mosaic_gpu"}})


def test_auto_takes_it_on_hopper_only_where_cudnn_does_not_apply(monkeypatch):
    """cuDNN stays first while it measures faster (docs/attention.md); segment ids go to the Hopper kernels
    rather than the portable one."""
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_gpu, "on_hopper", lambda: True)
    q = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
    ids = (jnp.zeros((1, 128), jnp.int32),) * 2
    assert attention_module._resolve_impl("auto", q, None) == "cudnn"
    assert attention_module._resolve_impl("auto", q, ids) == "pallas_mosaic_gpu"
    assert attention_module._resolve_impl("auto", q.astype(jnp.float16), ids) == "pallas"   # bf16 only
    monkeypatch.setattr(mosaic_gpu, "on_hopper", lambda: False)
    assert attention_module._resolve_impl("auto", q, ids) == "pallas"
