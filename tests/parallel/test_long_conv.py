"""Sequence-parallel long convolution (longseq.parallel.long_conv) against the single-device op.

Like test_attention.py, grids larger than the machine are skipped: `make test` runs this folder
with 8 simulated CPU devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longseq import parallel
from longseq.ops import long_conv

GRIDS = [(1, 1, 8), (1, 2, 4), (1, 8, 1), (2, 2, 2), (1, 1, 2), (1, 1, 1)]


def make_mesh(grid) -> Mesh:
    if np.prod(grid) > jax.device_count():
        pytest.skip(f"needs {np.prod(grid)} devices, {jax.device_count()} available (make test simulates 8)")
    return Mesh(np.array(jax.devices()[:np.prod(grid)]).reshape(grid), ("data", "seq_q", "seq_kv"))


@pytest.mark.parametrize("grid", GRIDS, ids=["x".join(map(str, g)) for g in GRIDS])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "circular"])
def test_matches_the_single_device_op(grid, causal):
    """float32, forward and the gradients of u and k; a kernel shorter than the sequence."""
    mesh = make_mesh(grid)
    rng = np.random.default_rng(sum(grid) + causal)
    u = jnp.asarray(rng.standard_normal((2, 48, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((16, 40)), jnp.float32) / 8
    weights = jnp.asarray(rng.standard_normal(u.shape), jnp.float32)

    def sharded(u, k):
        return parallel.long_conv(u, k, mesh=mesh, causal=causal)

    def single(u, k):
        return long_conv(u, k, causal=causal)

    def output_and_grads(fn):   # one compiled call
        out, pullback = jax.vjp(fn, u, k)
        return out, pullback(weights)

    for fn in (sharded, single):
        fn.out, fn.grads = jax.jit(output_and_grads, static_argnums=0)(fn)
    np.testing.assert_allclose(sharded.out, single.out, atol=1e-5, rtol=1e-5)
    for got, want, name in zip(sharded.grads, single.grads, ("du", "dk")):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_bad_arguments_are_named():
    mesh = make_mesh((1, 2, 2))
    u = jnp.ones((2, 16, 6))
    with pytest.raises(ValueError, match=r"u: channels=6 is not divisible by the 4 devices of mesh axes"):
        parallel.long_conv(u, jnp.ones((6, 16)), mesh=mesh)
    with pytest.raises(ValueError, match=r"u: seq=6 is not divisible by the 4 devices"):
        parallel.long_conv(jnp.ones((2, 6, 8)), jnp.ones((8, 6)), mesh=mesh)
    with pytest.raises(ValueError, match=r"k: expected \[channels=8, kernel_len\]"):
        parallel.long_conv(jnp.ones((2, 16, 8)), jnp.ones((4, 16)), mesh=mesh)
    with pytest.raises(ValueError, match="mesh: has no axis 'seq'"):
        parallel.long_conv(jnp.ones((2, 16, 8)), jnp.ones((8, 16)), mesh=mesh, seq_q_axis="seq")
