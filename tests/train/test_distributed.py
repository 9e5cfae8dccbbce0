"""Multi-process runs through jax.distributed: the environment parsing, and a real 2-process run on CPU
(2 simulated devices per process, Gloo collectives) whose losses equal one process with 4 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from longseq.distributed import distributed_arguments
from longseq.train.metrics import read_metrics


def test_explicit_variables_give_the_arguments():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_arguments(env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)


@pytest.mark.parametrize("env,message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID: a multi-process run needs all"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES: expected a non-negative integer, got 'two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID: expected 0 … 1, got 2"),
])
def test_incomplete_or_malformed_variables_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        distributed_arguments(env)


def test_clusters_jax_detects_itself_and_single_process_runs():
    assert distributed_arguments({"SLURM_NTASKS": "8"}) == {}
    assert distributed_arguments({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
    assert distributed_arguments({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert distributed_arguments({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert distributed_arguments({}) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    (tmp_path / "none.yaml").write_text("{}\n")
    args = ["model.d_model=32", "model.num_layers=2", "model.mixer=hybrid", "model.num_heads=2",
            "data.seq_len=32", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32", "data.batch_size=8",
            "data.eval_batches=2", "optim.warmup_steps=2", "train.progress=false", "train.steps=6",
            "train.log_every=1", "train.eval_every=6", "train.checkpoint_every=3", "mesh.data=4",
            f"train.run_dir={tmp_path}"]
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()  # make test's: cheaper compiles
                     if not flag.startswith("--xla_force_host_platform_device_count"))
    command = [sys.executable, "-m", "longseq", "train", str(tmp_path / "none.yaml"), *args]

    one = subprocess.run([*command, "train.name=one"], capture_output=True, text=True, timeout=300,
                         env={**base, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr

    port = free_port()
    processes = [subprocess.Popen([*command, "train.name=two"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**base, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2",
                                                  "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index)})
                 for index in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "4 device(s)" in outputs[0][0]

    def losses(name):
        return [row["loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl") if row["split"] == "train"]

    assert len(losses("two")) == 6  # process 0 alone wrote the metrics: no duplicated rows
    np.testing.assert_allclose(losses("two"), losses("one"), rtol=2e-5)
    assert (tmp_path / "two" / "checkpoints" / "6").exists()
