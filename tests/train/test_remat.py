"""Rematerialisation policies (`train.remat`): the same losses and gradients under every policy, and
each keeps what it says for the backward pass (read from JAX's own account of the saved residuals)."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import types

import jax
import numpy as np
import pytest

from longseq.config import ConfigError, load_config
from longseq.data import make_task
from longseq.layers.remat import offload_supported
from longseq.train.trainer import Steps

B, S, D, LAYERS = 2, 64, 32, 3
BASE = ["model.mixer=hybrid", "model.hybrid_pattern=[attention,gated_conv,long_conv]", f"model.num_layers={LAYERS}",
        f"model.d_model={D}", "model.num_heads=2", "model.dropout=0.1", "data.task=mqar", f"data.seq_len={S}",
        f"data.batch_size={B}", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32"]
POLICIES = {"none": [], "full": [], "save_dots": [], "save_named": ["train.remat_save=[attention_out,mlp_hidden]"],
            "offload": ["train.remat_save=[attention_qkv,long_conv_out]"]}


def loss_function(policy: str, *overrides: str):
    """(loss(params), params) of one training batch (dropout on) under a remat policy."""
    config = load_config(None, [*BASE, f"train.remat={policy}", *(overrides or POLICIES[policy])])
    task = make_task(config.data)
    steps = Steps(config, task)
    state = steps.init()
    batch = task.batch("train", 0, B)

    def loss(params):
        sums, _ = steps._forward(params, state["rest"], batch, training=True)
        return sums["loss_sum"] / sums["weight_sum"]

    return loss, state["params"]


def saved_activation_bytes(policy: str, *overrides: str) -> tuple[int, int]:
    """Bytes of the residuals autodiff keeps for the backward pass, parameters excluded: (on the device,
    in host memory)."""
    loss, params = loss_function(policy, *overrides)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    kept = {"device": 0, "host": 0}
    for line in out.getvalue().splitlines():
        match = re.match(r"(\w+)(<host>)?\[([\d,]*)\] (.*)", line)
        if match and not match.group(4).startswith("from the argument"):
            itemsize = 2 if match.group(1) in ("bf16", "f16") else 8 if match.group(1) == "c64" else 4
            size = itemsize * int(np.prod([int(n) for n in match.group(3).split(",") if n]))
            kept["host" if match.group(2) else "device"] += size
    return kept["device"], kept["host"]


@functools.cache
def reference(*overrides: str):
    """(loss, gradients) of one batch under remat=none: what every other setting must give."""
    loss, params = loss_function("none", *overrides)
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_named", "offload"])
def test_every_policy_gives_the_same_loss_and_gradients(policy):
    """Float32, dropout on (the recomputed blocks must draw the same masks), all three mixers."""
    reference_loss, reference_grads = reference()
    loss, params = loss_function(policy)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, reference_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        # recomputation may fuse differently (GPU): float32 rounding, scaled to each gradient
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_policies_keep_what_they_say():
    """none keeps every activation; full only each block's input (plus the embedding, the final norm and
    the loss); save_named / save_dots lie in between."""
    kept = {policy: saved_activation_bytes(policy)[0] for policy in ("none", "full", "save_named", "save_dots")}
    block_input = B * S * D * 4
    assert kept["full"] < kept["save_named"] < kept["none"], kept
    assert kept["full"] < kept["save_dots"] < kept["none"], kept
    assert kept["full"] <= (LAYERS + 6) * block_input, kept  # the L block inputs, embedding, norm, logits
    assert kept["none"] > 4 * kept["full"], kept


@pytest.mark.parametrize("scan", ["false", "true"])
def test_offloading_the_block_inputs_moves_the_residual_stream_to_the_host(scan):
    """offload + remat_save=[block_input]: what full keeps, less the L float32 block inputs, which go to
    pinned host memory instead (unrolled, and stacked by the scan)."""
    full = saved_activation_bytes("full", f"model.scan_layers={scan}")
    offload = saved_activation_bytes("offload", "train.remat_save=[block_input]", f"model.scan_layers={scan}")
    assert full[1] == 0
    assert offload == (full[0] - LAYERS * B * S * D * 4, LAYERS * B * S * D * 4), (full, offload)


def test_offload_is_refused_at_start_where_there_is_no_pinned_host_memory(monkeypatch, tmp_path):
    def device(*kinds):
        return types.SimpleNamespace(addressable_memories=lambda: [types.SimpleNamespace(kind=k) for k in kinds])

    assert offload_supported([device("device", "pinned_host")])
    assert not offload_supported([device("device", "pinned_host"), device("device")])
    from longseq.train import trainer

    monkeypatch.setattr(trainer, "offload_supported", lambda devices: False)
    config = load_config(None, [*BASE, "train.remat=offload", "train.remat_save=[mlp_hidden]", f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train\.remat: offload moves activations to pinned host memory, which "
                                          r"these \w+ devices do not have \(their memories: .*\); use remat=save_named"):
        trainer.train(config)
    assert not (tmp_path / "run").exists()  # refused before the run directory is written


@pytest.mark.parametrize("policy,scan", [("none", "false"), ("full", "true")])
def test_the_mlp_in_position_blocks_gives_the_same_loss_and_gradients(policy, scan):
    """train.mlp_chunk: the MLP over 4 blocks of 16 positions equals the MLP over all 64 (float32,
    dropout on), alone and inside a rematerialised (scanned) block."""
    reference_loss, reference_grads = reference(f"model.scan_layers={scan}")
    loss, params = loss_function(policy, "train.mlp_chunk=16", f"model.scan_layers={scan}", *POLICIES[policy])
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, reference_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_the_mlp_in_position_blocks_keeps_no_whole_hidden_layer():
    """Without remat, autodiff keeps each SwiGLU's [batch, seq, 2·hidden] and [batch, seq, hidden]
    activations; in position blocks it keeps only the blocks' inputs, so at least one hidden-layer-sized
    float32 tensor per layer less."""
    hidden = load_config(None, BASE).model.mlp_hidden or 128
    whole, _ = saved_activation_bytes("none")
    blocked, _ = saved_activation_bytes("none", "train.mlp_chunk=16")
    assert whole - blocked >= LAYERS * B * S * hidden * 4, (whole, blocked)


@pytest.mark.parametrize("overrides,message", [
    (["train.mlp_chunk=24"], r"train\.mlp_chunk: 24 does not divide data\.seq_len=64"),
    (["train.mlp_chunk=16", "train.remat=save_named", "train.remat_save=[mlp_hidden]"],
     r"remat_save: mlp_hidden cannot be kept with train\.mlp_chunk"),
    (["train.remat=save_named"], r"remat_save: remat=save_named keeps the activations it names; name at least one"),
    (["train.remat=full", "train.remat_save=[mlp_hidden]"], r"remat_save: only remat=save_named or offload reads it"),
    (["train.remat=save_named", "train.remat_save=[mlp]"], r"train\.remat_save.*mlp"),
    (["train.remat=some"], r"train\.remat.*some"),
])
def test_bad_remat_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])
