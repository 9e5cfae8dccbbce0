import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from longseq.config import KernelsConfig, LongConvConfig, ModelConfig
from longseq.layers import ConvKernel
from longseq.models import DecoderLM, SequenceClassifier, build_model

# Jit whole calls: op-by-op dispatch compiles every primitive separately (slow on CPU).
apply = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))
KERNELS = KernelsConfig()
VOCAB, SEQ = 16, 12
tokens = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, size=(2, SEQ)), jnp.int32)


def tiny(mixer="long_conv", **overrides) -> ModelConfig:
    return ModelConfig(**{**dict(mixer=mixer, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mlp_hidden=64, hybrid_pattern=("gated_conv", "attention")), **overrides})


def lm(config, seed=0):
    return DecoderLM(config, KERNELS, vocab_size=VOCAB, seq_len=SEQ, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


@pytest.mark.parametrize("mixer", ["attention", "long_conv", "gated_conv", "hybrid"])
def test_lm_shapes_and_causality(mixer):
    model = lm(tiny(mixer))
    logits = apply(model, tokens)
    assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == jnp.float32
    scale = np.abs(np.asarray(logits)).max()
    for t in (0, 5, SEQ - 1):
        changed = tokens.at[:, t].set((tokens[:, t] % (VOCAB - 1)) + 1)
        assert not np.array_equal(np.asarray(changed), np.asarray(tokens))
        diff = np.abs(np.asarray(apply(model, changed) - logits)).max(axis=(0, 2))  # [seq]
        # exact zeros for attention; FFT round-off (~1e-7 relative) for the convolutions
        assert np.all(diff[:t] <= 1e-5 * scale), (t, diff)
        assert diff[t] > 1e-3 * scale, (t, diff)
        if t < SEQ - 1:
            assert diff[t + 1:].max() > 1e-3 * scale


@pytest.mark.parametrize("mixer", ["long_conv", "hybrid"])
def test_lm_bfloat16_compute(mixer):
    f32 = lm(tiny(mixer, tie_embeddings=False))
    bf16 = lm(tiny(mixer, tie_embeddings=False, compute_dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    assert bf16.lm_head.kernel.shape == (32, VOCAB)
    logits32, logits16 = apply(f32, tokens), apply(bf16, tokens)
    assert logits16.shape == (2, SEQ, VOCAB) and logits16.dtype == jnp.float32
    # same parameters (same seed): bfloat16 compute stays close to float32, but is not float32
    err = np.abs(np.asarray(logits16 - logits32)).max() / np.abs(np.asarray(logits32)).max()
    assert 0 < err < 0.05, err


def test_tied_embeddings_share_the_matrix():
    tied, untied = lm(tiny()), lm(tiny(tie_embeddings=False))
    assert not hasattr(tied, "lm_head") and hasattr(untied, "lm_head")
    count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(untied) - count(tied) == 32 * VOCAB


def test_lm_segment_ids_isolate_packed_sequences():
    model = lm(tiny("attention"))
    ids = jnp.array([[0] * 5 + [1] * 7] * 2)
    changed = tokens.at[:, 2].set((tokens[:, 2] % (VOCAB - 1)) + 1)
    run = lambda t, seg: np.asarray(apply(model, t, segment_ids=seg))
    packed = run(changed, (ids, ids)) - run(tokens, (ids, ids))
    assert np.abs(packed[:, 5:]).max() == 0 and np.abs(packed[:, 2:5]).max() > 0
    assert np.abs(run(changed, None)[:, 5:] - run(tokens, None)[:, 5:]).max() > 0


@pytest.mark.parametrize("mixer", ["attention", "long_conv", "gated_conv"])
def test_classifier_ignores_padded_positions(mixer):
    model = SequenceClassifier(tiny(mixer), KERNELS, vocab_size=VOCAB, num_classes=3, seq_len=SEQ,
                               rngs=nnx.Rngs(0))
    mask = jnp.asarray(np.arange(SEQ)[None] < np.array([[7], [10]]), jnp.float32)
    logits = apply(model, tokens, mask=mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    padded_changed = jnp.where(mask > 0, tokens, (tokens + 3) % VOCAB)
    assert not np.array_equal(np.asarray(padded_changed), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(apply(model, padded_changed, mask=mask)), np.asarray(logits),
                               rtol=1e-5, atol=1e-6)
    real_changed = tokens.at[:, 0].set((tokens[:, 0] % (VOCAB - 1)) + 1)  # bidirectional: position 0 matters
    assert np.abs(np.asarray(apply(model, real_changed, mask=mask) - logits)).min() > 1e-5


def test_conv_kernels_are_found_by_type():
    model = lm(tiny("hybrid", num_layers=3))  # gated_conv, attention, gated_conv
    kernels = jax.tree.leaves(nnx.state(model, ConvKernel))
    assert len(kernels) == 2 and all(k.shape == (32, SEQ) for k in kernels)
    assert not jax.tree.leaves(nnx.state(lm(tiny("attention")), ConvKernel))
    classifier = build_model(tiny("long_conv"), KERNELS, kind="classification", vocab_size=VOCAB, num_classes=2,
                             seq_len=SEQ, rngs=nnx.Rngs(0))
    assert len(jax.tree.leaves(nnx.state(classifier, ConvKernel))) == 4  # bidirectional: 2 kernels a layer


def test_build_model():
    assert isinstance(build_model(tiny(), KERNELS, kind="lm", vocab_size=VOCAB, num_classes=None, seq_len=SEQ,
                                  rngs=nnx.Rngs(0)), DecoderLM)
    assert isinstance(build_model(tiny(), KERNELS, kind="classification", vocab_size=VOCAB, num_classes=4,
                                  seq_len=SEQ, rngs=nnx.Rngs(0)).head.kernel, nnx.Param)
    with pytest.raises(ValueError, match="kind"):
        build_model(tiny(), KERNELS, kind="seq2seq", vocab_size=VOCAB, num_classes=2, seq_len=SEQ, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        build_model(tiny(), KERNELS, kind="classification", vocab_size=VOCAB, num_classes=None, seq_len=SEQ,
                    rngs=nnx.Rngs(0))


def test_jit_split_merge_matches_nnx_jit():
    model = lm(tiny("hybrid"))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    np.testing.assert_allclose(np.asarray(forward(state, tokens)), np.asarray(apply(model, tokens)),
                               rtol=1e-6, atol=1e-6)


def test_dropout_modes_and_rng_state_resume():
    model = lm(tiny("hybrid", dropout=0.3, long_conv=LongConvConfig(kernel_dropout=0.2)))
    assert jax.tree.leaves(nnx.state(model, nnx.RngState))
    saved = nnx.clone(nnx.state(model))
    a, b = apply(model, tokens), apply(model, tokens)
    assert not np.allclose(np.asarray(a), np.asarray(b))  # the dropout streams advance in the state
    nnx.update(model, saved)  # restoring a checkpointed state replays the same masks
    np.testing.assert_array_equal(np.asarray(apply(model, tokens)), np.asarray(a))
    model.eval()
    e1, e2 = apply(model, tokens), apply(model, tokens)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    model.train()
    assert not np.allclose(np.asarray(apply(model, tokens)), np.asarray(e1))


@pytest.mark.parametrize("mixer", ["long_conv", "attention"])
def test_tiny_lm_overfits_one_batch(mixer):
    model = lm(tiny(mixer))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(4, SEQ)), jnp.int32)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(30)]
    assert losses[0] > 2.0 and losses[-1] < 0.2 * losses[0], losses


@pytest.mark.parametrize("mixer", ["attention", "long_conv", "gated_conv"])
def test_classifier_logits_do_not_depend_on_the_padding_length(mixer):
    """The same 10 real tokens padded to 16 and to 24 positions give the same logits: the convolutions
    are linear (zero-padded), not circular, so trailing zeros add nothing, however many there are."""
    model = SequenceClassifier(tiny(mixer), KERNELS, vocab_size=VOCAB, num_classes=3, seq_len=24,
                               rngs=nnx.Rngs(0))
    real = np.random.default_rng(3).integers(1, VOCAB, size=(2, 10))
    logits = []
    for length in (16, 24):
        padded = np.zeros((2, length), np.int32)
        padded[:, :10] = real
        mask = jnp.asarray(np.arange(length)[None] < 10, jnp.float32).repeat(2, 0)
        logits.append(np.asarray(apply(model, jnp.asarray(padded), mask=mask)))
    assert np.abs(logits[0]).max() > 1e-3
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
