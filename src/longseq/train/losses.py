"""Losses and accuracy for the two task kinds, as pure functions of logits (or hidden states) and a batch.

Each returns *sums* (loss, correct predictions, counted weight) rather than means, so that several
batches (an evaluation set, or data-parallel shards) combine exactly by adding them up. The LM sums also
carry `z_sum` = Σ weight · log(Z)², the z-loss (PaLM) a run may add to its objective (`train.z_loss`);
`loss_sum` is the cross-entropy alone, so reported losses stay comparable.

`chunked_lm_sums` is the same LM loss from the final hidden states and the output matrix, computed over
blocks of positions so that the [batch, seq, vocab] logits never exist: a custom_vjp keeps each token's
log-normaliser and recomputes a block's logits in the backward pass.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax


def token_statistics(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits: [..., vocab] float32, targets: [...] int -> (log Z, cross-entropy, correct), each [...] float32.

    One pass finds each row's largest logit and its index (the prediction); log Z shifts by that logit, so
    no second pass looks for the maximum (the 370M LM's logits are 4 GiB at 4 × 8K).
    """
    best = jnp.argmax(logits, axis=-1)
    shift = jax.lax.stop_gradient(jnp.take_along_axis(logits, best[..., None], axis=-1))
    log_z = shift[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z, log_z - target_logit, (best == targets).astype(jnp.float32)


def lm_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Weighted next-token cross-entropy.

    logits: [batch, seq, vocab] (float32), targets: [batch, seq] int, weights: [batch, seq] float
    (1 where the position counts). Returns {"loss_sum", "z_sum", "correct_sum", "weight_sum"}, float32 scalars.
    """
    log_z, token_loss, correct = token_statistics(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return {"loss_sum": jnp.sum(token_loss * weights), "z_sum": jnp.sum(log_z ** 2 * weights),
            "correct_sum": jnp.sum(correct * weights), "weight_sum": jnp.sum(weights)}


def chunked_lm_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                    chunk: int) -> dict[str, jax.Array]:
    """`lm_sums(hidden @ head.T, targets, weights)` with at most [batch, chunk, vocab] logits at a time.

    hidden: [batch, seq, d_model] (the matmuls run in its dtype, accumulating in float32);
    head: [vocab, d_model]; targets, weights: [batch, seq]; chunk: positions per block, dividing seq.
    Block j holds the positions j, j + n, j + 2n, … (n = seq / chunk), so a sequence-sharded batch keeps
    every block spread over all of its devices.
    """
    batch, seq, _ = hidden.shape
    if chunk < 1 or seq % chunk:
        raise ValueError(f"chunk: {chunk} must divide the sequence length {seq}")
    blocks = seq // chunk

    def to_blocks(x):  # [batch, seq, ...] -> [blocks, batch, chunk, ...], position = i · blocks + j
        return jnp.moveaxis(x.reshape(batch, chunk, blocks, *x.shape[2:]), 2, 0)

    weights = weights.astype(jnp.float32)
    loss_sum, z_sum, correct_sum = _blocked_cross_entropy(
        to_blocks(hidden), head.astype(hidden.dtype), to_blocks(targets), to_blocks(weights))
    return {"loss_sum": loss_sum, "z_sum": z_sum, "correct_sum": correct_sum, "weight_sum": jnp.sum(weights)}


def _block_logits(h, head):
    """h: [batch, chunk, d_model], head: [vocab, d_model] -> float32 logits [batch, chunk, vocab]."""
    return jnp.einsum("bcd,vd->bcv", h, head, preferred_element_type=jnp.float32)


def _blocked_forward(h_blocks, head, t_blocks, w_blocks):
    """(loss_sum, z_sum, correct_sum) and each token's (log Z, cross-entropy + log Z² terms) for the backward."""
    def block(sums, xs):
        h, t, w = xs
        log_z, token_loss, correct = token_statistics(_block_logits(h, head), t)
        sums = (sums[0] + jnp.sum(token_loss * w), sums[1] + jnp.sum(log_z ** 2 * w), sums[2] + jnp.sum(correct * w))
        return sums, (log_z, token_loss)

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(block, (zero, zero, zero), (h_blocks, t_blocks, w_blocks))


@jax.custom_vjp
def _blocked_cross_entropy(h_blocks, head, t_blocks, w_blocks):
    """h_blocks: [blocks, batch, chunk, d_model]; head: [vocab, d_model]; t_blocks, w_blocks: [blocks, batch,
    chunk] -> (loss_sum, z_sum, correct_sum) float32 scalars."""
    return _blocked_forward(h_blocks, head, t_blocks, w_blocks)[0]


def _blocked_cross_entropy_fwd(h_blocks, head, t_blocks, w_blocks):
    sums, (log_z, token_loss) = _blocked_forward(h_blocks, head, t_blocks, w_blocks)
    return sums, (h_blocks, head, t_blocks, w_blocks, log_z, token_loss)


def _blocked_cross_entropy_bwd(residuals, cotangents):
    """d loss_sum / d logits = w (softmax − onehot); d z_sum / d logits = w · 2 log Z · softmax. The block's
    logits are recomputed; the head's gradient accumulates in float32 over the blocks."""
    h_blocks, head, t_blocks, w_blocks, log_z, token_loss = residuals
    g_loss, g_z, _ = cotangents  # correct_sum is piecewise constant

    def block(d_head, xs):
        h, t, w, lz = xs
        probs = jnp.exp(_block_logits(h, head) - lz[..., None])
        d_logits = (g_loss + 2.0 * g_z * lz)[..., None] * probs
        d_logits = d_logits - g_loss * jax.nn.one_hot(t, head.shape[0], dtype=jnp.float32)
        d_logits = (d_logits * w[..., None]).astype(h.dtype)
        dh = jnp.einsum("bcv,vd->bcd", d_logits, head, preferred_element_type=jnp.float32).astype(h.dtype)
        d_head = d_head + jnp.einsum("bcv,bcd->vd", d_logits, h, preferred_element_type=jnp.float32)
        return d_head, dh

    d_head, dh_blocks = jax.lax.scan(block, jnp.zeros(head.shape, jnp.float32),
                                     (h_blocks, t_blocks, w_blocks, log_z))
    d_weights = g_loss * token_loss + g_z * log_z ** 2
    return dh_blocks, d_head.astype(head.dtype), np.zeros(t_blocks.shape, jax.dtypes.float0), d_weights


_blocked_cross_entropy.defvjp(_blocked_cross_entropy_fwd, _blocked_cross_entropy_bwd)


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
