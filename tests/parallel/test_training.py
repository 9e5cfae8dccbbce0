"""Training with the sequence sharded over the mesh equals training on one device.

Same initialisation and batches; every loss logged over a few steps must agree to float32 rounding.
Needs 8 devices: `make test` runs this folder with 8 simulated CPU devices.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from longseq.config import ConfigError, load_config
from longseq.train import train
from longseq.train.metrics import read_metrics

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "data.seq_len=32", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32", "data.batch_size=8",
        "data.eval_batches=1", "optim.warmup_steps=2", "optim.lr=3e-3", "train.progress=false",
        "train.steps=6", "train.log_every=2", "train.eval_every=6", "train.checkpoint_every=6"]


def losses(tmp_path, name, *overrides):
    config = load_config(None, [*TINY, f"train.run_dir={tmp_path}", f"train.name={name}", *overrides])
    run_dir = train(config)["run_dir"]
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    """The single-device curve of each mixer, trained once for all strategies."""
    cache = {}

    def get(mixer):
        if mixer not in cache:
            cache[mixer] = losses(tmp_path_factory.mktemp(mixer), "one", f"model.mixer={mixer}", "mesh.data=1")
        return cache[mixer]

    return get


MESHES = {"attention2d": ["mesh.data=2", "mesh.seq_q=2", "mesh.seq_kv=2"], "ring": ["mesh.data=2", "mesh.seq_kv=4"],
          "ulysses": ["mesh.data=1", "mesh.seq_q=4"], "none": ["mesh.data=2", "mesh.seq_q=2", "mesh.seq_kv=2"],
          "auto": ["mesh.data=2", "mesh.seq_q=4"],  # auto: the cost model picks the strategy and the grid of 4
          "attention2d+kept": ["mesh.data=1", "mesh.seq_q=4", "mesh.seq_kv=2", "model.attention_keep_gathered=true"]}


# The strategies with attention layers (usp and double_ring, compositions of ring and ulysses, are checked
# against one device at the op level, forward and gradients, on five grids of 8: test_attention.py); the hybrid
# (gated conv + attention: the sequence-parallel long convolution beside sharded attention) with the default.
@pytest.mark.parametrize("mixer,strategy", [*(("attention", s) for s in MESHES), ("hybrid", "attention2d")])
def test_sequence_sharded_training_matches_one_device(tmp_path, one_device_losses, mixer, strategy):
    mesh = MESHES[strategy]
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (make test simulates them)")
    model = [f"model.mixer={mixer}", f"model.attention_parallel={strategy.removesuffix('+kept')}"]
    one = one_device_losses(mixer)  # attention_parallel plays no part on one device
    sharded = losses(tmp_path, "sharded", *model, *mesh)
    assert len(one) == len(sharded) == 3
    np.testing.assert_allclose(sharded, one, rtol=1e-4)


def test_sequence_sharded_long_conv_lm_matches_one_device(tmp_path, one_device_losses):
    """The long-conv LM with its convolutions split over 4 sequence devices (all-to-all scheme)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (make test simulates them)")
    sharded = losses(tmp_path, "sharded", "model.mixer=long_conv", "mesh.data=2", "mesh.seq_q=2", "mesh.seq_kv=2")
    np.testing.assert_allclose(sharded, one_device_losses("long_conv"), rtol=1e-4)


def test_mesh_must_fit_the_sequence_and_the_machine(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.seq_len: 30 is not divisible by the mesh\.seq_q × mesh\.seq_kv = 4"):
        load_config(None, [*TINY, "data.seq_len=30", "mesh.seq_q=2", "mesh.seq_kv=2"])
    with pytest.raises(ConfigError, match=r"model\.attention_parallel: ulysses needs num_heads=4 divisible by the 8"):
        load_config(None, [*TINY, "model.mixer=attention", "model.attention_parallel=ulysses", "mesh.seq_kv=8"])
    with pytest.raises(ConfigError, match=r"kernels\.attention: attention_parallel=ring runs each block's backward"):
        load_config(None, [*TINY, "model.mixer=attention", "model.attention_parallel=ring", "mesh.seq_kv=2",
                           "kernels.attention=xla"])
    with pytest.raises(ConfigError, match=r"model\.attention_keep_gathered: only attention2d gathers blocks it could keep "
                                          r"\(attention_parallel is 'ring'\)"):
        load_config(None, [*TINY, "model.attention_parallel=ring", "model.attention_keep_gathered=true"])
    with pytest.raises(ConfigError, match=r"model\.d_model: 36 is not divisible by the 8 sequence devices"):
        load_config(None, [*TINY, "model.mixer=gated_conv", "model.d_model=36", "mesh.seq_kv=8"])
    with pytest.raises(ConfigError, match=r"mesh: asks for \d+ devices \(data × fsdp × seq_q × seq_kv = 1 × 1 × \d+ × 1\), but only \d+ are available"):
        train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "mesh.data=1",
                                 f"mesh.seq_q={2 * jax.device_count()}"]))


# ----------------------------------------------------------------------------------------------
# FSDP: parameters, gradients and optimizer state split over mesh.fsdp

def test_fsdp_spec_splits_the_largest_dimension_the_axis_divides():
    from jax.sharding import PartitionSpec as P

    from longseq.parallel.fsdp import fsdp_spec

    assert fsdp_spec((32, 128), 4) == P(None, "fsdp")
    assert fsdp_spec((128, 32), 4) == P("fsdp", None)
    assert fsdp_spec((64, 64), 4) == P("fsdp", None)  # ties: the first
    assert fsdp_spec((6, 30), 4) == P()  # no dimension divisible: replicated
    assert fsdp_spec((30, 8), 4) == P(None, "fsdp")  # not the largest, but the largest divisible one
    assert fsdp_spec((), 4) == P()
    assert fsdp_spec((32, 128), 1) == P()


@pytest.mark.parametrize("mixer,mesh", [
    ("attention", ["mesh.data=2", "mesh.fsdp=4"]),
    ("attention", ["mesh.data=1", "mesh.fsdp=2", "mesh.seq_q=2", "mesh.seq_kv=2"]),  # FSDP × attention2d
    ("long_conv", ["mesh.data=1", "mesh.fsdp=4", "mesh.seq_kv=2"]),  # FSDP × sequence-parallel long conv
])
def test_fsdp_training_matches_one_device(tmp_path, one_device_losses, mixer, mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (make test simulates them)")
    sharded = losses(tmp_path, "fsdp", f"model.mixer={mixer}", *mesh)
    np.testing.assert_allclose(sharded, one_device_losses(mixer), rtol=1e-4)


def test_fsdp_splits_the_attention_inputs_as_the_batch(monkeypatch):
    """Under FSDP (scanned, rematerialised, as on the GPU where this failed), q, k and v reach the attention
    op split as the batch, all three alike: without the layers' constraint XLA split them by heads, the
    FSDP-sharded weights' way (gathering activations instead of weights), and cuDNN's partitioner refuses
    q, k, v split unlike."""
    from longseq.data import make_task
    from longseq.layers import attention as attention_layer
    from longseq.train.trainer import Steps, make_mesh

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    seen = []
    real = attention_layer.attention_op

    def spy(q, k, v, **kwargs):
        for x in (q, k, v):
            jax.debug.inspect_array_sharding(x, callback=lambda sharding: seen.append(sharding.spec))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_layer, "attention_op", spy)
    config = load_config(None, ["model.mixer=attention", "model.d_model=64", "model.num_layers=2", "model.num_heads=4",
                                "data.task=mqar", "data.seq_len=32", "data.batch_size=2", "data.mqar.num_kv_pairs=4",
                                "data.mqar.vocab_size=32", "mesh.data=1", "mesh.fsdp=2", "model.scan_layers=true",
                                "train.remat=full", "model.compute_dtype=bfloat16"])
    task = make_task(config.data)
    mesh = make_mesh(config)
    Steps(config, task, mesh).compile_train_step(mesh, task.batch("train", 0, 2))
    assert seen and all(spec[0] in ("fsdp", ("data", "fsdp")) and not any(spec[1:]) for spec in seen), seen


def test_fsdp_state_lives_in_shards_and_the_step_holds_a_quarter_of_it(tmp_path):
    """With mesh.fsdp=4 every parameter and Adam moment with a dimension divisible by 4 is split four
    ways from initialisation on, and the compiled step's arguments (state + batch) per device shrink
    accordingly against fsdp=1 on the same 4 devices (data=4)."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (make test simulates them)")
    from longseq.data import make_task
    from longseq.train.trainer import Steps, _put_batch, make_mesh

    argument_bytes = {}
    for fsdp in (1, 4):
        config = load_config(None, [*TINY, "model.mixer=hybrid", "model.d_model=64", "data.batch_size=4",
                                    f"mesh.data={4 // fsdp}", f"mesh.fsdp={fsdp}"])
        task = make_task(config.data)
        mesh = make_mesh(config)
        steps = Steps(config, task, mesh)
        state = steps.init()
        big = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 2 and leaf.shape[0] % 4 == 0]
        assert len(big) > 10
        for leaf in big:
            shard = leaf.addressable_shards[0].data.shape
            assert (shard[0] * shard[1]) * (fsdp if fsdp > 1 else 1) == leaf.size, (leaf.shape, shard)
        batch = _put_batch(task.batch("train", 0, config.data.batch_size), mesh)
        memory = steps.train_step.lower(state, batch).compile().memory_analysis()
        argument_bytes[fsdp] = memory.argument_size_in_bytes
    assert argument_bytes[4] < 0.3 * argument_bytes[1], argument_bytes


def test_a_run_resumes_on_another_fsdp_split(tmp_path, one_device_losses):
    """Checkpoints hold global arrays: a run saved with fsdp=4 resumes with fsdp=1 (and the same
    batches), ending where an uninterrupted run ends."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (make test simulates them)")
    import shutil

    first = load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.name=run", "model.mixer=attention",
                               "mesh.data=1", "mesh.fsdp=4", "train.checkpoint_every=2"])
    run_dir = train(first)["run_dir"]
    for step in ("4", "6"):
        shutil.rmtree(run_dir / "checkpoints" / step)
    resumed = train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.name=run", "model.mixer=attention",
                                       "mesh.data=1", "mesh.fsdp=1", "train.checkpoint_every=2"]))
    assert resumed["step"] == 6
    final = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"][-1]
    np.testing.assert_allclose(final, one_device_losses("attention")[-1], rtol=1e-4)


def test_scanned_layers_train_the_same_sharded(tmp_path):
    """model.scan_layers with FSDP, attention2d over 2×2 and full remat equals the scanned model on one device;
    the sharded run also runs its MLPs in 4 blocks of 8 positions (train.mlp_chunk: each block spread over the
    4 sequence devices), which changes nothing either."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (make test simulates them)")
    model = ["model.mixer=hybrid", "model.num_layers=4", "model.scan_layers=true", "train.remat=full"]
    one = losses(tmp_path / "one", "one", *model, "mesh.data=1")
    sharded = losses(tmp_path / "sharded", "sharded", *model, "mesh.data=1", "mesh.fsdp=2", "mesh.seq_q=2",
                     "mesh.seq_kv=2", "train.mlp_chunk=8")
    np.testing.assert_allclose(sharded, one, rtol=1e-4)


@pytest.mark.parametrize("mixer,strategy,order", [("attention", "ring", "zigzag"), ("hybrid", "ring", "natural")])
def test_the_lm_keeps_its_tokens_in_zigzag_order_where_every_mixer_balances_in_place(mixer, strategy, order):
    """An all-attention LM under ring or attention2d reorders its tokens once (zigzag, with their rotary
    positions) instead of every layer swapping half-chunks; its logits and gradients are the one-device
    model's. Models with convolutions stay in natural order (and attention2d in zigzag order trains as one device
    does: test_sequence_sharded_training_matches_one_device)."""
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh

    from longseq.models import DecoderLM
    from longseq.parallel import SequenceParallel

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (make test simulates them)")
    config = load_config(None, [*TINY, f"model.mixer={mixer}", "kernels.attention=reference"])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "seq_q", "seq_kv"))

    def model(plan):
        return DecoderLM(config.model, config.kernels, vocab_size=32, seq_len=32, rngs=nnx.Rngs(0),
                         sequence_parallel=plan)

    sharded, single = model(SequenceParallel(mesh, strategy)), model(None)
    assert sharded.sequence_parallel.order == order
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (4, 32)), jnp.int32)

    def loss_and_grads(lm):
        def loss(lm):
            return jnp.mean(jax.nn.log_softmax(lm(tokens))[..., 0] * jnp.arange(32))

        return nnx.jit(nnx.value_and_grad(loss))(lm)

    (value, grads), (value_ref, grads_ref) = loss_and_grads(sharded), loss_and_grads(single)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for grad, grad_ref in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(grads_ref))):
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5 * np.abs(grad_ref).max())
