"""The LM loss, plain and chunked (`train.loss_chunk`): equal sums and gradients, and the chunked one never
holds the [batch, seq, vocab] logits; the per-token statistics against optax; the vocabulary projection's
backward in the compute dtype."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longseq.config import load_config
from longseq.models.lm import vocab_logits
from longseq.train import train
from longseq.train.losses import chunked_lm_sums, lm_sums, token_statistics
from longseq.train.metrics import read_metrics


def problem(dtype, batch=3, seq=24, d_model=16, vocab=50, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, seq, d_model), jnp.float32).astype(dtype)
    head = jax.random.normal(keys[1], (vocab, d_model), jnp.float32) * 0.5
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    weights = (jax.random.uniform(keys[3], (batch, seq)) > 0.3).astype(jnp.float32)  # some positions masked
    return hidden, head, targets, weights


def equations(jaxpr):
    """Every equation of a jaxpr, inside scans, custom rules and other nested jaxprs too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for inner in (param if isinstance(param, (list, tuple)) else [param]):
                if hasattr(inner, "eqns"):
                    yield from equations(inner)
                elif hasattr(getattr(inner, "jaxpr", None), "eqns"):
                    yield from equations(inner.jaxpr)


def objective(sums_fn, z_loss):
    def f(hidden, head, weights, targets):
        sums = sums_fn(hidden, head, targets, weights)
        return sums["loss_sum"] + z_loss * sums["z_sum"], sums
    return f


def plain(hidden, head, targets, weights):
    logits = jnp.einsum("bld,vd->blv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return lm_sums(logits, targets, weights)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 5, 24])  # 5 does not divide 24: refused below; 1 and 24 are the extremes
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_equals_plain_forward_and_gradients(dtype, rtol, chunk, z_loss):
    hidden, head, targets, weights = problem(dtype)
    if 24 % chunk:
        with pytest.raises(ValueError, match=r"chunk: 5 must divide the sequence length 24"):
            chunked_lm_sums(hidden, head, targets, weights, chunk=chunk)
        return
    grad = lambda fn: jax.jit(jax.value_and_grad(objective(fn, z_loss), argnums=(0, 1, 2), has_aux=True))
    (want, want_sums), want_grads = grad(plain)(hidden, head, weights, targets)
    (got, got_sums), got_grads = grad(lambda *a: chunked_lm_sums(*a, chunk=chunk))(hidden, head, weights, targets)
    np.testing.assert_allclose(got, want, rtol=rtol)
    for key in ("loss_sum", "z_sum", "correct_sum", "weight_sum"):
        np.testing.assert_allclose(got_sums[key], want_sums[key], rtol=rtol, err_msg=key)
    for name, g, w in zip(("hidden", "head", "weights"), got_grads, want_grads):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: exp would overflow without the shift
def test_token_statistics_equal_optax_and_logsumexp_forward_and_gradients(scale):
    keys = jax.random.split(jax.random.key(1), 3)
    logits = jax.random.normal(keys[0], (3, 7, 41), jnp.float32) * scale
    top = logits[0, 0].max()
    logits = logits.at[0, 0, 0].set(top).at[0, 0, 40].set(top)  # a tie: argmax predicts the first index
    targets = jax.random.randint(keys[1], (3, 7), 0, 41).at[0, 0].set(40)
    g_z, g_loss = jax.random.normal(keys[2], (2, 3, 7))

    def want(x):
        log_z = jax.nn.logsumexp(x, axis=-1)
        loss = optax.softmax_cross_entropy_with_integer_labels(x, targets)
        return log_z, loss, (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32)

    def scalar(fn):
        return lambda x: jnp.sum(g_z * fn(x)[0]) + jnp.sum(g_loss * fn(x)[1])

    got, expected = token_statistics(logits, targets), want(logits)
    for name, g, w in zip(("log_z", "loss", "correct"), got, expected):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
    assert float(got[2][0, 0]) == 0.0  # the tie went to index 0, not to the target 40
    np.testing.assert_allclose(jax.grad(scalar(lambda x: token_statistics(x, targets)))(logits),
                               jax.grad(scalar(want))(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_vocab_logits_gradients_match_autodiff_with_the_matmuls_in_the_compute_dtype(dtype, rtol):
    hidden, head, _, _ = problem(dtype)
    d_logits = jax.random.normal(jax.random.key(7), (*hidden.shape[:2], head.shape[0]), jnp.float32)

    def reference(h, w):  # float32 throughout: what the compute-dtype backward approximates
        return jnp.einsum("bld,vd->blv", h.astype(jnp.float32), w)

    def autodiff(h, w):  # JAX's own transpose of the float32-output matmul
        return jnp.einsum("bld,vd->blv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    np.testing.assert_allclose(vocab_logits(hidden, head), autodiff(hidden, head), rtol=0, atol=0)
    got = jax.vjp(vocab_logits, hidden, head)[1](d_logits)
    want = jax.vjp(reference, hidden, head)[1](d_logits)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    for name, g, w in zip(("hidden", "head"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)

    def dot_operand_dtypes(fn):  # of every matmul in the backward, inside the custom rule too
        jaxpr = jax.make_jaxpr(lambda h, w, g: jax.vjp(fn, h, w)[1](g))(hidden, head, d_logits).jaxpr
        return {str(v.aval.dtype) for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"
                for v in eqn.invars}

    with mock.patch.object(jax, "default_backend", lambda: "gpu"):  # traced only: the rule as a GPU runs it
        assert dot_operand_dtypes(vocab_logits) == {jnp.dtype(dtype).name}
        if dtype == jnp.bfloat16:  # what the custom rule is for: JAX's own backward multiplies in float32
            assert "float32" in dot_operand_dtypes(autodiff)


def test_the_chunked_loss_never_holds_the_logits():
    """No value in the jaxpr of the loss's gradient is as large as [batch, seq, vocab]; the plain one has some."""
    hidden, head, targets, weights = problem(jnp.float32, batch=2, seq=64, vocab=97)
    full = 2 * 64 * 97

    def largest(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: fn(h, w, targets, weights)["loss_sum"], argnums=(0, 1)))(hidden, head)
        return max(int(np.prod(v.aval.shape)) for eqn in equations(jaxpr.jaxpr) for v in eqn.outvars
                   if hasattr(v.aval, "shape"))

    assert largest(plain) >= full
    assert largest(lambda *a: chunked_lm_sums(*a, chunk=16)) <= full // 4  # [batch, 16, vocab] blocks


def test_training_with_a_chunked_loss_and_z_loss_matches_the_plain_loss(tmp_path):
    common = ["model.mixer=attention", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
              "data.task=mqar", "data.seq_len=64", "data.batch_size=4", "data.mqar.num_kv_pairs=4",
              "data.mqar.vocab_size=32", "train.steps=6", "train.log_every=2", "train.eval_every=6",
              "train.progress=false", f"train.run_dir={tmp_path}", "train.z_loss=1e-3"]

    def losses(name, *extra):
        run_dir = train(load_config(None, [*common, f"train.name={name}", *extra]))["run_dir"]
        return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]

    np.testing.assert_allclose(losses("chunked", "train.loss_chunk=16", "model.tie_embeddings=false"),
                               losses("plain", "model.tie_embeddings=false"), rtol=1e-5)
