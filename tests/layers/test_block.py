import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.config import KernelsConfig, LongConvConfig, ModelConfig
from longseq.layers import Attention, Block, GatedConv, LongConvMixer, make_mixer

# Jit whole calls: op-by-op dispatch compiles every primitive separately (slow on CPU).
apply = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))
KERNELS = KernelsConfig()
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 32)), jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mixer", ["attention", "long_conv", "gated_conv"])
def test_block_shapes_and_dtypes(mixer, dtype):
    config = ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, compute_dtype=dtype)
    block = Block(config, KERNELS, mixer=mixer, seq_len=8, causal=True, rngs=nnx.Rngs(0))
    y = apply(block, x)
    assert y.shape == x.shape and y.dtype == jnp.float32  # the residual stream keeps its dtype
    assert not np.allclose(np.asarray(y), np.asarray(x))
    if dtype == "bfloat16":
        assert apply(block.mixer, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
        assert apply(block.mlp, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(block, nnx.Param)))


def test_make_mixer_by_name():
    config = ModelConfig(d_model=32, num_heads=4)
    kinds = {"attention": Attention, "long_conv": LongConvMixer, "gated_conv": GatedConv}
    for name, cls in kinds.items():
        assert type(make_mixer(name, config, KERNELS, seq_len=8, causal=True, rngs=nnx.Rngs(0))) is cls
    with pytest.raises(ValueError, match="mixer"):
        make_mixer("rnn", config, KERNELS, seq_len=8, causal=True, rngs=nnx.Rngs(0))


def test_block_dropout_train_and_eval():
    with_dropout = ModelConfig(d_model=32, num_heads=4, dropout=0.5, long_conv=LongConvConfig(kernel_dropout=0.3))
    no_dropout = ModelConfig(d_model=32, num_heads=4)
    block = Block(with_dropout, KERNELS, mixer="long_conv", seq_len=8, causal=True,
                  rngs=nnx.Rngs(params=0, dropout=1))
    plain = Block(no_dropout, KERNELS, mixer="long_conv", seq_len=8, causal=True,
                  rngs=nnx.Rngs(params=0, dropout=1))
    assert jax.tree.leaves(nnx.state(block, nnx.RngState))  # the dropout streams are model state
    assert not jax.tree.leaves(nnx.state(plain, nnx.RngState))
    a, b = apply(block, x), apply(block, x)
    assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh masks every call
    assert not np.allclose(np.asarray(a), np.asarray(apply(plain, x)))
    block.eval()
    np.testing.assert_allclose(np.asarray(apply(block, x)), np.asarray(apply(plain, x)), rtol=1e-6)
    block.train()
    assert not np.allclose(np.asarray(apply(block, x)), np.asarray(apply(plain, x)))
