import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.layers import RMSNorm, SwiGLU, apply_rotary, default_mlp_hidden

# Jit whole calls: op-by-op dispatch compiles every primitive separately (slow on CPU).
apply = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_matches_numpy(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3.0 + 1.0
    norm = RMSNorm(8, dtype=dtype)
    norm.scale[...] = jnp.linspace(0.5, 2.0, 8)
    y = apply(norm, x.astype(dtype))
    assert y.shape == (2, 5, 8) and y.dtype == dtype
    xn = np.asarray(x.astype(dtype).astype(jnp.float32), np.float64)
    expected = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2.0, 8)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=tol, atol=tol)


def test_rmsnorm_statistics_in_float32():
    # Values whose squares overflow bfloat16's sum precision would still normalise to rms 1.
    x = jnp.full((1, 1, 64), 300.0, jnp.bfloat16)
    y = apply(RMSNorm(64, dtype=jnp.bfloat16), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, rtol=1e-2)


def test_default_mlp_hidden():
    assert default_mlp_hidden(128) == 384  # 341.3 -> 384
    assert default_mlp_hidden(96) == 256
    assert default_mlp_hidden(24) == 64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_shape_dtype_and_formula(dtype):
    mlp = SwiGLU(16, 32, dtype=dtype, rngs=nnx.Rngs(0))
    assert mlp.hidden == 32
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    y = apply(mlp, x.astype(dtype))
    assert y.shape == (2, 3, 16) and y.dtype == dtype
    x64 = np.asarray(x, np.float64)
    gate, up = (x64 @ np.asarray(w.kernel[...], np.float64) for w in (mlp.gate, mlp.up))
    expected = (gate / (1 + np.exp(-gate)) * up) @ np.asarray(mlp.down.kernel[...], np.float64)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=tol, atol=tol)
    assert SwiGLU(128, dtype=dtype, rngs=nnx.Rngs(0)).hidden == 384


def test_rotary_relative_position_property():
    head_dim = 16
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))

    @jax.jit
    def _score(m, n):
        qm = apply_rotary(q, m[None], theta=100.0)
        kn = apply_rotary(k, n[None], theta=100.0)
        return jnp.sum(qm * kn)

    score = lambda m, n: float(_score(jnp.int32(m), jnp.int32(n)))

    for offset in (0, 3, -5):
        scores = [score(m, m - offset) for m in (0, 7, 20, 101)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    # ... and it does depend on the offset.
    assert abs(score(10, 10) - score(10, 7)) > 1e-3
    assert abs(score(10, 7) - score(10, 13)) > 1e-3


def test_rotary_shapes_positions_and_norm():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 3, 8)), jnp.bfloat16)
    rope = jax.jit(apply_rotary)
    shared = rope(x, jnp.arange(6))
    batched = rope(x, jnp.stack([jnp.arange(6), jnp.arange(6) + 4]))
    assert shared.shape == x.shape and shared.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(shared[0], np.float32), np.asarray(batched[0], np.float32))
    shifted = rope(x[1:], jnp.arange(6) + 4)
    np.testing.assert_array_equal(np.asarray(batched[1:], np.float32), np.asarray(shifted, np.float32))
    assert not np.array_equal(np.asarray(batched[1], np.float32), np.asarray(shared[1], np.float32))
    # position 0 is the identity; rotations keep norms
    np.testing.assert_array_equal(np.asarray(shared[:, 0]), np.asarray(x[:, 0]))
    x32 = x.astype(jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(rope(x32, jnp.arange(6))), axis=-1),
                               np.linalg.norm(np.asarray(x32), axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(jnp.zeros((1, 2, 1, 5)), jnp.arange(2))


def _residuals(module, x):
    """The activations the backward pass of module(x) keeps, as (shape, dtype name), arguments excluded
    (read from `jax.ad_checkpoint.print_saved_residuals`, JAX's public listing of them)."""
    graph, params = nnx.split(module)
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        jax.ad_checkpoint.print_saved_residuals(lambda p, x: nnx.merge(graph, p)(x), params, x)
    saved = []
    for line in listing.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\] (.*)", line.strip())
        if match and "argument" not in match.group(3):
            saved.append((tuple(int(n) for n in match.group(2).split(",") if n), match.group(1)))
    return saved


def test_swiglu_backward_keeps_gate_up_and_hidden_only():
    mlp = SwiGLU(16, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16), jnp.bfloat16)
    wide = [r for r in _residuals(mlp, x) if r[0][-1] == 32 and len(r[0]) == 3]
    assert wide == [((2, 3, 32), "bf16")] * 3  # gate, up, silu(gate) ⊙ up; the sigmoid is recomputed


def test_rmsnorm_backward_keeps_no_float32_activation():
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    saved = _residuals(RMSNorm(16, dtype=jnp.bfloat16), x)
    assert not [r for r in saved if r[1] == "f32" and r[0][:2] == (2, 3)]


@pytest.mark.parametrize("module", ["norm", "mlp"])
def test_recomputed_backward_matches_plain_autodiff(module):
    key_x, key_dy = jax.random.split(jax.random.key(2))
    x = jax.random.normal(key_x, (2, 5, 16))
    if module == "norm":
        layer = RMSNorm(16)
        layer.scale[...] = jnp.linspace(0.5, 2.0, 16)
        plain = lambda p, x: x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * p["scale"]
    else:
        layer = SwiGLU(16, 32, rngs=nnx.Rngs(0))
        plain = lambda p, x: (jax.nn.silu(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]
    graph, params = nnx.split(layer)
    pure = nnx.to_pure_dict(params)
    dy = jax.random.normal(key_dy, (2, 5, 16))

    def loss(fn):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * dy), argnums=(0, 1)))(pure, x)

    ours = loss(lambda p, x: nnx.merge(graph, p)(x))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(loss(plain))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
