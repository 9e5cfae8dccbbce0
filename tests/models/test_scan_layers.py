"""model.scan_layers: the scanned model is the unrolled one with its layers' parameters stacked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longseq.config import ConfigError, load_config
from longseq.data import make_task
from longseq.layers.remat import Remat
from longseq.models import build_model
from longseq.train.trainer import Steps

SEQ = 32


def models(*overrides, remat: Remat = Remat(), kind: str = "lm"):
    """(unrolled, scanned) models of the same config; the scanned one holds the unrolled one's state
    (parameters and dropout RNG streams) stacked on the repeats axis."""
    config = load_config(None, ["model.d_model=32", "model.num_heads=2", f"data.seq_len={SEQ}", *overrides])
    build = lambda scan: build_model(  # noqa: E731
        load_config(None, ["model.d_model=32", "model.num_heads=2", f"data.seq_len={SEQ}", *overrides,
                           f"model.scan_layers={scan}"]).model,
        config.kernels, kind=kind, vocab_size=16, num_classes=3 if kind == "classification" else None,
        seq_len=SEQ, rngs=nnx.Rngs(params=0, dropout=1), remat=remat)
    unrolled, scanned = build("false"), build("true")
    pattern = len(config.model.layer_pattern())
    flat = dict(nnx.to_flat_state(nnx.state(unrolled)))
    stacked = {}
    for path, variable in nnx.to_flat_state(nnx.state(scanned)):
        if path[:3] == ("backbone", "layers", "blocks"):
            j, rest = path[3], path[4:]
            repeats = variable.get_value().shape[0]
            layers = [flat[("backbone", "blocks", g * pattern + j, *rest)].get_value() for g in range(repeats)]
            stacked[path] = variable.replace(jnp.stack(layers))
        else:
            stacked[path] = variable.replace(flat[path].get_value())
    nnx.update(scanned, nnx.from_flat_state(stacked))
    return unrolled, scanned


ATTENTION = ["model.mixer=attention", "model.num_layers=3"]
HYBRID = ["model.mixer=hybrid", "model.hybrid_pattern=[gated_conv,attention,long_conv]", "model.num_layers=6",
          "model.dropout=0.1"]


# full remat on the hybrid only: its pattern holds attention too
@pytest.mark.parametrize("overrides, policy", [(ATTENTION, "none"), (HYBRID, "none"), (HYBRID, "full")],
                         ids=["attention-none", "hybrid-none", "hybrid-full"])
def test_scanned_equals_unrolled_forward_and_gradients(overrides, policy):
    unrolled, scanned = models(*overrides, remat=Remat(policy))
    tokens = jax.random.randint(jax.random.key(0), (2, SEQ), 0, 16)

    def loss_and_grads(model):
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            out = nnx.merge(graphdef, params, rest, copy=True)(tokens)
            return jnp.mean(out ** 2), out

        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, out, dict(nnx.to_flat_state(grads))

    value_u, out_u, grads_u = loss_and_grads(unrolled)
    value_s, out_s, grads_s = loss_and_grads(scanned)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value_s, value_u, rtol=1e-5)
    pattern = 3 if "hybrid" in overrides[0] else 1
    for path, grad in grads_s.items():
        if path[:3] == ("backbone", "layers", "blocks"):
            want = jnp.stack([grads_u[("backbone", "blocks", g * pattern + path[3], *path[4:])].get_value()
                              for g in range(grad.get_value().shape[0])])
        else:
            want = grads_u[path].get_value()
        np.testing.assert_allclose(grad.get_value(), want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()) + 1e-9,
                                   err_msg=str(path))


def test_the_classifier_scans_too():
    unrolled, scanned = models("model.mixer=gated_conv", "model.num_layers=2", kind="classification")
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, 16)
    mask = jnp.arange(SEQ)[None] < jnp.array([[SEQ], [20]])
    unrolled.eval(), scanned.eval()
    np.testing.assert_allclose(scanned(tokens, mask=mask), unrolled(tokens, mask=mask), rtol=1e-5, atol=1e-6)


def test_scanned_layers_keep_their_optimizer_groups_and_need_whole_repeats():
    from longseq.train.optimizer import parameter_groups

    counts = {}
    for scan in ("false", "true"):
        config = load_config(None, ["model.d_model=32", "model.num_heads=2", f"data.seq_len={SEQ}", "model.mixer=hybrid",
                                    "model.num_layers=4", f"model.scan_layers={scan}"])
        groups = jax.tree.leaves(parameter_groups(Steps(config, make_task(config.data)).abstract_state["params"]))
        counts[scan] = {name: groups.count(name) for name in ("decay", "no_decay", "kernel")}
    # per layer the same groups: the unrolled model has each layer's leaves, the scanned one each pattern slot's
    assert counts["false"]["no_decay"] - 1 == 2 * (counts["true"]["no_decay"] - 1)
    assert counts["false"]["decay"] - 1 == 2 * (counts["true"]["decay"] - 1)
    with pytest.raises(ConfigError, match=r"model\.scan_layers: num_layers=3 is not a multiple of the 2 layers"):
        load_config(None, ["model.mixer=hybrid", "model.num_layers=3", "model.scan_layers=true"])
