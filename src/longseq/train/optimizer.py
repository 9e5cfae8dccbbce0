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
from longseq.models.backbone import SCANNED_LAYERS


def learning_rate_schedule(peak: float, config: OptimConfig, total_steps: int) -> optax.Schedule:
    """`f(count)`: the learning rate of the update made after `count` updates (optax's convention).

    Counting updates from 1 as the progress bar does: linear warmup reaching `peak` at update
    `warmup_steps` (so update 1 already moves, by peak / warmup_steps), then cosine decay reaching
    `peak * min_lr_ratio` at the last update, number `total_steps`.
    """
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * config.min_lr_ratio)
    return lambda count: schedule(count + 1)  # optax passes the number of updates done so far


def parameter_groups(params: dict[str, Any]) -> dict[str, Any]:
    """A pytree like `params` whose leaves name each parameter's group ("kernel"/"decay"/"no_decay").

    params: {"kernel": <long-conv kernels>, "other": <all other parameters>}. The rank that decides is the
    layer's own: scanned layers (model.scan_layers) stack their parameters on a leading [repeats] axis.
    """
    def group(path, leaf) -> str:
        stacked = any(getattr(key, "key", None) == SCANNED_LAYERS for key in path)
        return "decay" if leaf.ndim - stacked >= 2 else "no_decay"

    return {"kernel": jax.tree.map(lambda _: "kernel", params["kernel"]),
            "other": jax.tree_util.tree_map_with_path(group, params["other"])}


def make_optimizer(config: OptimConfig, total_steps: int, groups: Any) -> optax.GradientTransformation:
    """The full update rule: global-norm clipping (a no-op at grad_clip=0), then AdamW per parameter group.

    The structure of the optimizer state never depends on the config's values, so a run may resume
    with another learning rate or clipping threshold.
    """
    def adamw(peak_lr: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate_schedule(peak_lr, config, total_steps), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=weight_decay)

    kernel_lr = config.kernel_lr if config.kernel_lr is not None else config.lr
    tx = optax.multi_transform(
        {"decay": adamw(config.lr, config.weight_decay),
         "no_decay": adamw(config.lr, 0.0),
         "kernel": adamw(kernel_lr, config.kernel_weight_decay)},
        groups)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip if config.grad_clip > 0 else float("inf")), tx)
