"""Parameter groups and schedule: long-conv kernels get their own learning rate and weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from longseq.config import load_config
from longseq.layers import ConvKernel
from longseq.models import build_model
from longseq.train.optimizer import learning_rate_schedule, make_optimizer, parameter_groups


def split_params(mixer: str):
    config = load_config(None, [f"model.mixer={mixer}", "model.d_model=32", "model.num_heads=2", "data.seq_len=32",
                                "data.mqar.num_kv_pairs=4"])
    model = build_model(config.model, config.kernels, kind="lm", vocab_size=16, num_classes=0, seq_len=32,
                        rngs=nnx.Rngs(0))
    _, kernels, others, _ = nnx.split(model, ConvKernel, nnx.Param, ...)
    return config, {"kernel": kernels, "other": others}


def test_groups_follow_parameter_type_and_rank():
    _, params = split_params("gated_conv")
    groups = parameter_groups(params)
    kernel_labels = jax.tree.leaves(groups["kernel"])
    assert kernel_labels and set(kernel_labels) == {"kernel"}
    ranks = {label: set() for label in ("decay", "no_decay")}
    for label, leaf in zip(jax.tree.leaves(groups["other"]), jax.tree.leaves(params["other"])):
        ranks[label].add(leaf.ndim)
    assert ranks["decay"] and min(ranks["decay"]) >= 2
    assert ranks["no_decay"] and max(ranks["no_decay"]) <= 1


def test_kernel_learning_rate_and_decay_apply_to_kernels_only():
    config, params = split_params("long_conv")
    optim = load_config(None, ["optim.lr=0.1", "optim.kernel_lr=1e-4", "optim.warmup_steps=0", "optim.min_lr_ratio=1",
                               "optim.weight_decay=0", "optim.grad_clip=0"]).optim
    tx = make_optimizer(optim, total_steps=10, groups=parameter_groups(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves every entry by about its learning rate, whatever the gradient's scale
    kernel_steps = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(updates["kernel"])])
    other_steps = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(updates["other"])])
    np.testing.assert_allclose(kernel_steps, 1e-4, rtol=1e-3)
    np.testing.assert_allclose(other_steps, 0.1, rtol=1e-3)


def test_weight_decay_skips_vectors_and_kernels_by_default():
    _, params = split_params("long_conv")
    optim = load_config(None, ["optim.lr=0.5", "optim.weight_decay=0.1", "optim.warmup_steps=0", "optim.min_lr_ratio=1",
                               "optim.grad_clip=0"]).optim
    tx = make_optimizer(optim, total_steps=10, groups=parameter_groups(params))
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradient: only weight decay moves parameters
    updates, _ = tx.update(zeros, tx.init(params), params)
    groups = parameter_groups(params)
    for label, update, param in zip(jax.tree.leaves(groups), jax.tree.leaves(updates), jax.tree.leaves(params)):
        expected = -0.5 * 0.1 * np.asarray(param) if label == "decay" else np.zeros_like(param)
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-8, err_msg=label)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    optim = load_config(None, ["optim.lr=2.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    schedule = learning_rate_schedule(2.0, optim, total_steps=110)
    rate_of_update = {n: float(schedule(n - 1)) for n in (1, 5, 10, 60, 110)}  # optax counts updates done
    assert rate_of_update[1] == pytest.approx(0.2)  # the first update already moves the parameters
    assert rate_of_update[5] == pytest.approx(1.0)
    assert rate_of_update[10] == pytest.approx(2.0)
    assert rate_of_update[60] == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-4)  # cosine midpoint
    assert rate_of_update[110] == pytest.approx(0.2)  # the last update uses the floor


def test_first_update_moves_the_parameters():
    _, params = split_params("long_conv")
    optim = load_config(None, ["optim.warmup_steps=100"]).optim
    tx = make_optimizer(optim, total_steps=1000, groups=parameter_groups(params))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert min(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) > 0


def test_gradient_clipping_bounds_the_global_norm():
    _, params = split_params("attention")
    optim = load_config(None, ["optim.grad_clip=1.0", "optim.warmup_steps=0", "optim.b1=0"]).optim
    clipped = make_optimizer(optim, 10, parameter_groups(params))
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    # with clipping, Adam sees the clipped gradient: its second moment is far below the raw one
    state = clipped.init(params)
    _, state = clipped.update(huge, state, params)
    nu = jax.tree.leaves([s.nu for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                          if isinstance(s, optax.ScaleByAdamState)])
    assert max(float(jnp.max(v)) for v in nu) < 1.0
