"""AdamW with warmup + cosine decay, and parameter groups.

Three groups, chosen by parameter type and shape:
- `kernel`: long-convolution kernels (`longseq.layers.ConvKernel`), with their own learning rate and
  weight decay, as "Simple Hardware-Efficient Long Convolutions" trains them;
- `decay`: every other matrix (rank >= 2: projections, embeddings), with `optim.weight_decay`;
- `no_decay`: vectors and scalars (norm scales, biases, per-channel skips), no weight decay.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from longseq.config import OptimConfig


def learning_rate_schedule(peak: float, config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `peak * min_lr_ratio` at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * config.min_lr_ratio)


def parameter_groups(params: dict[str, Any]) -> dict[str, Any]:
    """A pytree like `params` whose leaves name each parameter's group ("kernel"/"decay"/"no_decay").

    params: {"kernel": <long-conv kernels>, "other": <all other parameters>}.
    """
    return {"kernel": jax.tree.map(lambda _: "kernel", params["kernel"]),
            "other": jax.tree.map(lambda leaf: "decay" if leaf.ndim >= 2 else "no_decay", params["other"])}


def make_optimizer(config: OptimConfig, total_steps: int, groups: Any) -> optax.GradientTransformation:
    """The full update rule: optional global-norm clipping, then AdamW per parameter group."""
    def adamw(peak_lr: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate_schedule(peak_lr, config, total_steps), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=weight_decay)

    kernel_lr = config.kernel_lr if config.kernel_lr is not None else config.lr
    tx = optax.multi_transform(
        {"decay": adamw(config.lr, config.weight_decay),
         "no_decay": adamw(config.lr, 0.0),
         "kernel": adamw(kernel_lr, config.kernel_weight_decay)},
        groups)
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx
