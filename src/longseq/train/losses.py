"""Losses and accuracy for the two task kinds, as pure functions of logits and a batch.

Each returns *sums* (loss, correct predictions, counted weight) rather than means, so that several
batches (an evaluation set, or data-parallel shards) combine exactly by adding them up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lm_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Weighted next-token cross-entropy.

    logits: [batch, seq, vocab] (float32), targets: [batch, seq] int, weights: [batch, seq] float
    (1 where the position counts). Returns {"loss_sum", "correct_sum", "weight_sum"}, float32 scalars.
    """
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return {"loss_sum": jnp.sum(token_loss * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def classification_sums(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Cross-entropy of one label per sequence. logits: [batch, classes], labels: [batch] int."""
    example_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(example_loss), "correct_sum": jnp.sum(correct),
            "weight_sum": jnp.asarray(labels.shape[0], jnp.float32)}


def means(sums: dict[str, jax.Array]) -> dict[str, float]:
    """{"loss", "accuracy"} from summed statistics (host floats)."""
    weight = max(float(sums["weight_sum"]), 1e-9)
    return {"loss": float(sums["loss_sum"]) / weight, "accuracy": float(sums["correct_sum"]) / weight}
