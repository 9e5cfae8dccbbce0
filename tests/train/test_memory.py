"""The memory report of a train step (`longseq.train.memory`), printed and checked before the first step."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longseq.cli import main
from longseq.config import ConfigError, load_config
from longseq.data import make_task
from longseq.train import memory as memory_lib
from longseq.train.memory import MemoryReport
from longseq.train.trainer import Steps, make_mesh

TINY = ["model.mixer=hybrid", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "data.task=mqar",
        "data.seq_len=64", "data.batch_size=4", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32"]


def report_for(*overrides) -> tuple[MemoryReport, Steps, dict]:
    config = load_config(None, [*TINY, *overrides])
    task = make_task(config.data)
    mesh = make_mesh(config)
    steps = Steps(config, task, mesh)
    compiled, report = steps.compile_train_step(mesh, task.batch("train", 0, config.data.batch_size))
    return report, steps, compiled


@pytest.mark.parametrize("fsdp", [1, 4])
def test_the_report_counts_the_state_each_device_holds(fsdp):
    if jax.device_count() < fsdp:
        pytest.skip(f"needs {fsdp} devices")
    report, steps, compiled = report_for("mesh.data=1", f"mesh.fsdp={fsdp}")
    state = steps.init()

    def held(tree):  # bytes device 0 holds of a pytree of arrays
        return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
                   if shard.device == jax.devices()[0])

    assert report.params == held(state["params"])
    assert report.optimizer == held(state["opt_state"])
    analysis = compiled.memory_analysis()
    assert report.temporaries == analysis.temp_size_in_bytes > 0
    assert report.fft_workspace == 2 * memory_lib.largest_fft_bytes(compiled.as_text()) > 0  # hybrid: long convs
    assert report.total == (report.params + report.optimizer + report.other_inputs + report.temporaries
                            + report.outputs + report.fft_workspace)


def test_a_step_larger_than_the_device_is_refused_naming_what_helps():
    report = MemoryReport(params=2 * 2**30, optimizer=4 * 2**30, other_inputs=0, temporaries=90 * 2**30,
                          outputs=0, device_bytes=80 * 2**30, device="NVIDIA H100 80GB HBM3")
    config = load_config(None, TINY)
    with pytest.raises(ConfigError, match=r"train: one step needs 96\.0 GiB per device, more than the 80\.0 GiB of "
                                          r"NVIDIA H100.*train\.remat=full \(now none\).*train\.loss_chunk \(now unset\).*"
                                          r"mesh\.fsdp \(now 1\).*"
                                          r"mesh\.seq_q / mesh\.seq_kv"):
        report.check(config)
    dataclasses.replace(report, device_bytes=100 * 2**30).check(config)  # fits
    dataclasses.replace(report, device_bytes=None).check(config)  # unknown (CPU): nothing to check


def test_the_fft_workspace_is_counted_from_the_largest_fft():
    """Causal long convolution of [2, 1000, 16]: FFTs of 2000 points (1001 complex values), the input's
    spectrum [2, 16, 1001] complex64 the largest; the float64 version twice the bytes."""
    from longseq.ops import long_conv
    from longseq.train.memory import largest_fft_bytes

    def compiled_text(dtype):
        u, k = jnp.ones((2, 1000, 16), dtype), jnp.ones((16, 1000), dtype)
        step = jax.jit(jax.grad(lambda u, k: long_conv(u, k, impl="fft").sum(), argnums=(0, 1)))
        return step.lower(u, k).compile().as_text()

    assert largest_fft_bytes(compiled_text(jnp.float32)) == 2 * 16 * 1001 * 8
    if hasattr(jax, "enable_x64"):  # a context manager in the jax versions we support
        with jax.enable_x64(True):
            assert largest_fft_bytes(compiled_text(jnp.float64)) == 2 * 16 * 1001 * 16
    assert largest_fft_bytes(jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8))).compile().as_text()) == 0


def test_a_step_offloading_more_than_the_host_allows_is_refused(monkeypatch):
    from longseq.train.memory import HOST_LIMIT_VARIABLE, host_memory_limit

    config = load_config(None, TINY)
    report = MemoryReport(params=0, optimizer=0, other_inputs=0, temporaries=2**30, outputs=0,
                          device_bytes=80 * 2**30, device="NVIDIA H100 80GB HBM3", host=96 * 2**30)
    assert "offloaded to host memory: 96.00 GiB" in report.line()
    monkeypatch.delenv(HOST_LIMIT_VARIABLE, raising=False)
    assert host_memory_limit() <= 64 * 2**30
    with pytest.raises(ConfigError, match=r"train\.remat: the step offloads 96\.0 GiB to host memory, more than the "
                                          r"[\d.]+ GiB the host allows \(XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB raises"):
        report.check(config)
    monkeypatch.setenv(HOST_LIMIT_VARIABLE, "100000")  # the machine's own memory still bounds it
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert host_memory_limit() == physical
    dataclasses.replace(report, host=physical // 2).check(config)  # fits


def test_train_refuses_before_it_writes_or_allocates_anything(monkeypatch, tmp_path):
    from longseq.train import trainer

    real = memory_lib.memory_report
    monkeypatch.setattr(trainer, "memory_report", lambda *a, **k: dataclasses.replace(real(*a, **k), device_bytes=1000))
    with pytest.raises(ConfigError, match=r"train: one step needs .* more than the 0\.0 GiB"):
        trainer.train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.name=big"]))
    assert not (tmp_path / "big").exists()


def test_train_and_plan_print_the_memory_line(tmp_path, capsys):
    assert main(["plan", "configs/mqar_attention.yaml", "train.remat=full"]) == 0
    out = capsys.readouterr().out
    assert "memory per device: params" in out and "activations and temporaries" in out
    assert main(["train", "configs/mqar_attention.yaml", "train.steps=1", f"train.run_dir={tmp_path}",
                 "train.progress=false"]) == 0
    assert "memory per device: params" in capsys.readouterr().out
