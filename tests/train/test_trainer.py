"""End-to-end training on tiny configs: learning, exact resume after SIGKILL, Ctrl-C, divergence, eval.

The subprocess tests run the real `longseq` command, as a user would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from longseq.cli import resolve
from longseq.config import ConfigError, load_config
from longseq.train import evaluate_run, train
from longseq.train.metrics import read_metrics

TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "data.seq_len=32",
        "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=32", "data.batch_size=8", "data.eval_batches=2",
        "optim.warmup_steps=5", "train.progress=false"]


def tiny(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.name=tiny", *overrides])


# GPUs reduce in a varying order (atomics) unless asked not to: bit-for-bit comparisons need it. No-op on CPU.
DETERMINISTIC = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true")}


def cli(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "longseq", "train", str(tmp_path / "none.yaml"), *TINY,
            f"train.run_dir={tmp_path}", f"train.name={name}", *overrides]


@pytest.fixture
def empty_config(tmp_path):
    (tmp_path / "none.yaml").write_text("{}\n")
    return tmp_path


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"}


@pytest.mark.parametrize("mixer", ["long_conv", "attention"])
def test_loss_decreases_and_run_directory_is_complete(tmp_path, mixer):
    result = train(tiny(tmp_path, f"model.mixer={mixer}", "train.steps=60", "train.log_every=5",
                        "train.eval_every=30", "train.checkpoint_every=30", "optim.lr=3e-3"))
    run_dir = result["run_dir"]
    losses = train_losses(run_dir)
    assert losses[60] < losses[5] - 0.3, losses  # an untrained model stays near ln(vocab)
    for name in ("config.yaml", "metrics.jsonl", "metrics.png"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]
    saved = load_config(run_dir / "config.yaml")
    assert saved.model.mixer == mixer and saved.train.steps == 60
    eval_rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "eval"]
    assert [row["step"] for row in eval_rows] == [30, 60]
    assert eval_rows[-1]["loss"] == pytest.approx(result["loss"])
    # `longseq eval` recomputes the same numbers from the last checkpoint
    evaluated = evaluate_run(run_dir)
    assert evaluated["step"] == 60
    assert evaluated["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"])


def test_rerunning_a_finished_run_resumes_at_its_end(tmp_path):
    config = tiny(tmp_path, "train.steps=6", "train.checkpoint_every=3")
    first = train(config)
    again = train(config)
    assert again["step"] == 6 and again["loss"] == pytest.approx(first["loss"])


def test_resume_refuses_a_changed_model_data_or_horizon_but_takes_a_new_learning_rate(tmp_path, capsys):
    train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=2"))
    for override, old, new in (("model.d_model=64", 32, 64), ("data.seq_len=48", 32, 48), ("train.steps=8", 4, 8)):
        key = override.split("=")[0].replace(".", r"\.")
        with pytest.raises(ConfigError, match=rf"{key}: this run directory .* has checkpoints made with {old}, now {new}"):
            train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=2", override))
    capsys.readouterr()
    train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.log_every=2", "optim.lr=1e-4"))
    assert "changed: optim.lr: 0.001 -> 0.0001" in capsys.readouterr().out


def test_a_run_without_checkpoints_may_change_anything(tmp_path):
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {d_model: 16}\n")  # e.g. left by a run that failed early
    assert train(tiny(tmp_path, "train.steps=2"))["step"] == 2


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_with_identical_losses(empty_config):
    """One uninterrupted run, one killed by SIGKILL and one stopped by Ctrl-C (SIGINT, which saves a checkpoint
    first), both rerun to the end: every logged loss equals the uninterrupted run's, bit for bit."""
    tmp_path = empty_config
    # dropout: the RNG state must resume too; log rows every 7 steps, checkpoints every 20: rows must not
    # depend on where the run was cut
    common = ["train.steps=300", "train.log_every=7", "train.checkpoint_every=20", "train.eval_every=300",
              "model.dropout=0.1", "model.long_conv.kernel_dropout=0.1"]
    subprocess.run(cli(tmp_path, "whole", *common), check=True, capture_output=True, env=DETERMINISTIC)
    whole = train_losses(tmp_path / "whole")
    expected_rows = sorted({*range(7, 301, 7), *range(20, 301, 20), 300})
    assert sorted(whole) == expected_rows

    for name, sig in (("killed", signal.SIGKILL), ("interrupted", signal.SIGINT)):
        process = subprocess.Popen(cli(tmp_path, name, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=DETERMINISTIC)
        wait_for(tmp_path / name / "checkpoints" / "20", process)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
        saved = [int(p.name) for p in (tmp_path / name / "checkpoints").iterdir() if p.name.isdigit()]
        stopped_at = max(saved)
        assert 20 <= stopped_at < 300, f"{name}: the run finished before it was stopped"
        if sig == signal.SIGINT:
            assert process.returncode == 130, stderr
            assert "checkpoint saved" in stderr and "rerun the same command to resume" in stderr
        resumed = subprocess.run(cli(tmp_path, name, *common), capture_output=True, text=True, env=DETERMINISTIC)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed {tmp_path / name} from step {stopped_at}" in resumed.stdout
        restarted = train_losses(tmp_path / name)
        # none lost, none duplicated. Ctrl-C logs the steps since the last row at the step it stopped at, as every
        # checkpoint does, so the next row after it means fewer steps than the uninterrupted run's: skip that one.
        assert sorted(restarted) == sorted({*expected_rows, stopped_at}), name
        shortened = {min(s for s in expected_rows if s > stopped_at)} if stopped_at not in expected_rows else set()
        compared = [s for s in expected_rows if s not in shortened]
        assert len(compared) >= len(expected_rows) - 1
        assert [restarted[s] for s in compared] == [whole[s] for s in compared], name  # bit-for-bit


def test_divergence_stops_with_a_clear_message_and_keeps_only_finite_checkpoints(empty_config):
    tmp_path = empty_config
    result = subprocess.run(cli(tmp_path, "diverged", "train.steps=50", "train.checkpoint_every=1",
                                "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0"),
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "training diverged at step" in result.stderr and "last good checkpoint is step" in result.stderr
    run_dir = tmp_path / "diverged"
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 50
    assert np.isfinite(evaluate_run(run_dir)["loss"])
    # the advice is accepted: a lower learning rate resumes from the last good checkpoint (that
    # state, one update at lr=1e30 old, is finite but ruined, so it may diverge again: not tested)
    rerun = subprocess.run(cli(tmp_path, "diverged", "train.steps=50", "train.checkpoint_every=1", "optim.lr=1e-3",
                               "optim.warmup_steps=0", "optim.grad_clip=0"), capture_output=True, text=True)
    assert f"resumed {run_dir} from step {max(saved)}" in rerun.stdout, rerun.stderr
    assert "changed: optim.lr: 1e+30 -> 0.001" in rerun.stdout


def test_divergence_before_any_checkpoint_says_so(empty_config):
    result = subprocess.run(cli(empty_config, "early", "train.steps=50", "optim.lr=1e30", "optim.warmup_steps=0",
                                "optim.grad_clip=0"), capture_output=True, text=True)
    assert result.returncode == 1 and "no checkpoint was saved before it" in result.stderr


def test_cli_config_show_prints_the_resolved_config(empty_config):
    tmp_path = empty_config
    shown = subprocess.run([sys.executable, "-m", "longseq", "config", "show", str(tmp_path / "none.yaml"),
                            "train.steps=5", "model.mixer=attention"], capture_output=True, text=True, check=True)
    import yaml

    data = yaml.safe_load(shown.stdout)
    assert data["train"]["steps"] == 5 and data["model"]["mixer"] == "attention"
    assert data["train"]["name"] == "none"  # runs are named after their config file by default
    assert resolve(str(tmp_path / "none.yaml"), ["train.steps=5", "model.mixer=attention"]).train.steps == 5


def test_cli_reports_config_errors_before_compiling(empty_config):
    tmp_path = empty_config
    result = subprocess.run(cli(tmp_path, "bad", "model.d_modle=3"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "config error: model.d_modle: unknown key; did you mean model.d_model?" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_eval_prints_json(tmp_path):
    train(tiny(tmp_path, "train.steps=3"))
    shown = subprocess.run([sys.executable, "-m", "longseq", "eval", str(tmp_path / "tiny")],
                           capture_output=True, text=True, check=True)
    result = json.loads(shown.stdout.strip().splitlines()[-1])
    assert result["step"] == 3 and 0 <= result["accuracy"] <= 1
    missing = subprocess.run([sys.executable, "-m", "longseq", "eval", str(tmp_path / "nothing")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


def test_mesh_larger_than_the_machine_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"mesh\.data: asks for 64 devices \(data × fsdp × seq_q × seq_kv = 64 × 1 × 1 × 1\), but only \d+ are available"):
        train(tiny(tmp_path, "mesh.data=64", "data.batch_size=64"))




def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    config = tiny(tmp_path, "model.compute_dtype=bfloat16", "model.mixer=hybrid", "model.num_layers=2",
                  "train.steps=60", "train.log_every=5", "optim.lr=3e-3")
    result = train(config)
    losses = train_losses(result["run_dir"])
    assert np.isfinite(result["loss"]) and losses[60] < losses[5] - 0.3, losses
    from longseq.train.trainer import Steps
    from longseq.data import make_task

    state = Steps(config, make_task(config.data)).init()
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {np.dtype("float32")}


def test_data_parallel_over_four_devices_matches_one_device(empty_config):
    """The batch is split over a 4-device data mesh (simulated CPUs); the losses equal one device's."""
    tmp_path = empty_config
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    common = ["train.steps=8", "train.log_every=1", "model.mixer=hybrid", "model.num_layers=2"]
    outputs = {}
    for devices in (1, 4):
        run = subprocess.run(cli(tmp_path, f"dp{devices}", *common, f"mesh.data={devices}"),
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        outputs[devices] = run.stdout
    assert f"{4} device(s)" in outputs[4] and "1 device(s)" in outputs[1]
    one, four = train_losses(tmp_path / "dp1"), train_losses(tmp_path / "dp4")
    assert sorted(one) == sorted(four) == list(range(1, 9))
    np.testing.assert_allclose([four[s] for s in range(1, 9)], [one[s] for s in range(1, 9)], rtol=2e-5)


def test_pallas_attention_trains_like_the_reference(tmp_path):
    """The Transformer LM with the Pallas kernel (interpret mode on CPU) follows the reference's loss
    curve: same initialisation and batches, so float32 runs agree to rounding."""
    curves = {}
    for impl in ("reference", "pallas"):
        result = train(tiny(tmp_path, "model.mixer=attention", "model.num_kv_heads=1", "train.steps=12",
                            "train.log_every=3", "train.eval_every=12", "train.checkpoint_every=12",
                            "optim.lr=3e-3", f"kernels.attention={impl}", f"train.name={impl}"))
        curves[impl] = train_losses(result["run_dir"])
    assert curves["pallas"].keys() == curves["reference"].keys() == {3, 6, 9, 12}
    np.testing.assert_allclose(list(curves["pallas"].values()), list(curves["reference"].values()), rtol=1e-4)
    assert curves["pallas"][12] < curves["pallas"][3]


def test_the_train_state_is_plain_dicts_of_arrays(tmp_path):
    """The state crosses jit on every step. nnx.State flattens in Python (~20 µs a leaf: milliseconds per step
    for a 24-layer model); plain dicts and optax's namedtuples flatten in C++. The model still round-trips."""
    from flax import nnx

    from longseq import data as data_lib
    from longseq.train.trainer import Steps

    config = tiny(tmp_path)
    steps = Steps(config, data_lib.make_task(config.data))
    states = [node for node in jax.tree.leaves(steps.abstract_state, is_leaf=lambda x: isinstance(x, nnx.State))
              if isinstance(node, nnx.State)]
    assert not states
    assert type(steps.abstract_state["params"]["other"]) is dict and type(steps.abstract_state["rest"]) is dict
