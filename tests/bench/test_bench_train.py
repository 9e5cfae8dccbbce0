"""`longseq bench train`: the end-to-end step benchmark, on a tiny config on CPU."""

import json

import jax
import pytest

from longseq.bench.train import datasheet_peak, format_row, model_flops_per_step, run_train_bench
from longseq.cli import main
from longseq.config import load_config
from longseq import data as data_lib
from longseq.train.trainer import Steps

TINY = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "model.mlp_hidden=128", "data.seq_len=128",
        "data.mqar.vocab_size=100", "data.batch_size=2"]


def test_model_flops_count_every_linear_kernel_and_the_head_as_the_anchor_does():
    """The anchor's count: L·(D·3·H·hd + H·hd·D + D·2F + F·D) + D·V matmul parameters (untied head),
    6 of them per token, plus 6·L·T·H·hd per token of causal attention."""
    config = load_config("configs/bench_lm_370m.yaml", TINY)
    task = data_lib.make_task(config.data)
    params = Steps(config, task).abstract_state["params"]
    D, L, H, hd, F, V, T = 64, 2, 2, 32, 128, 100, 128
    matmul = L * (D * 3 * H * hd + H * hd * D + D * 2 * F + F * D) + D * V
    flops = model_flops_per_step(config, params, task.vocab_size)
    assert flops["matmul_params"] == matmul
    assert flops["flops"] == pytest.approx(6 * matmul * 2 * T + 6 * L * T * H * hd * 2 * T)
    tied = model_flops_per_step(load_config("configs/bench_lm_370m.yaml", TINY + ["model.tie_embeddings=true"]),
                                Steps(load_config("configs/bench_lm_370m.yaml", TINY + ["model.tie_embeddings=true"]),
                                      task).abstract_state["params"], task.vocab_size)
    assert tied["matmul_params"] == matmul  # the head reuses the embedding table: still D·V in the matmuls


def test_long_conv_layers_count_only_their_projections():
    """The long-conv kernels ([channels, seq] each) and the embedding table are not matmul parameters."""
    config = load_config("configs/bench_lm_370m.yaml", TINY + ["model.mixer=long_conv"])
    task = data_lib.make_task(config.data)
    steps = Steps(config, task)
    params = steps.abstract_state["params"]
    flops = model_flops_per_step(config, params, task.vocab_size)
    conv_kernels = sum(x.size for x in jax.tree.leaves(params["kernel"]))
    assert conv_kernels >= 2 * 64 * 128 and flops["attention_flops"] == 0
    assert 0 < flops["matmul_params"] <= steps.num_params - conv_kernels - 100 * 64


def test_row_on_cpu_and_the_cli(tmp_path, capsys):
    row = run_train_bench(load_config("configs/bench_lm_370m.yaml", TINY), iters=2, warmup=1, matmul_size=128)
    assert row["step_ms"] > 0 and row["tokens"] == 256
    assert row["tokens_per_s"] == pytest.approx(256 / (row["step_ms"] / 1e3))
    assert row["model_tflops"] == pytest.approx(row["flops"] / (row["step_ms"] / 1e3) / 1e12)
    assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU: no datasheet peak, no allocator stats
    assert row["compiled_gib"] > 0 and 0 < row["loss"] < 10 and row["compile_s"] > 0
    assert "| attention |" in format_row(row)
    assert main(["bench", "train", "configs/bench_lm_370m.yaml", *TINY, "--iters", "1", "--warmup", "0",
                 "--matmul-size", "64", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "train.json").read_text())["batch"] == 2
    assert "tokens/s" in capsys.readouterr().out


def test_utilisation_is_per_device_on_a_mesh():
    """On a data-parallel mesh of 2 the step's FLOPs are spread over both chips: the fraction of one chip's
    ceiling counts half of them."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (make test simulates 8)")
    row = run_train_bench(load_config("configs/bench_lm_370m.yaml", TINY + ["mesh.data=2"]), iters=1, warmup=1,
                          matmul_size=128)
    assert row["devices"] == 2
    assert row["model_tflops_per_device"] == pytest.approx(row["model_tflops"] / 2)
    assert row["matmul_fraction"] == pytest.approx(row["model_tflops_per_device"] / row["matmul_tflops"])


def test_bad_arguments_and_peaks():
    with pytest.raises(ValueError, match="iters: expected a positive integer, got 0"):
        run_train_bench(load_config("configs/bench_lm_370m.yaml", TINY), iters=0)
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("cpu") is None
