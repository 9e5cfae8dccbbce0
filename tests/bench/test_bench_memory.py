"""`longseq bench memory`: the sweep's rows, its refusal of what cannot fit, and where a series stops."""

from __future__ import annotations

import dataclasses
import json

import pytest

from longseq.bench import memory as bench_memory
from longseq.cli import main
from longseq.train import memory as memory_lib
from longseq.train import trainer

SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.mlp_hidden=64",
         "data.mqar.vocab_size=100"]
CONFIG = "configs/bench_lm_370m.yaml"


def test_measure_runs_a_step_or_refuses_one_that_cannot_fit(monkeypatch):
    row = bench_memory.measure(CONFIG, [*SMALL, "data.seq_len=128", "data.batch_size=1", "train.remat=full"],
                               iters=1, warmup=0)
    assert row["status"] == "ok" and row["remat"] == "full" and row["seq_len"] == 128
    assert row["predicted_gib"] > 0 and row["step_ms"] > 0 and row["tokens_per_s"] == pytest.approx(128e3 / row["step_ms"])
    real = memory_lib.memory_report
    monkeypatch.setattr(trainer, "memory_report", lambda *a, **k: dataclasses.replace(real(*a, **k), device_bytes=1))
    refused = bench_memory.measure(CONFIG, [*SMALL, "data.seq_len=128", "data.batch_size=1"], iters=1, warmup=0)
    assert refused["status"] == "does not fit"
    assert refused["predicted_gib"] == pytest.approx(row["predicted_gib"], rel=0.5)


def test_a_series_stops_at_its_first_failure(monkeypatch, tmp_path):
    calls = []

    def child(config_path, overrides, iters, warmup, timeout_s):
        seq = int(next(o for o in overrides if o.startswith("data.seq_len=")).split("=")[1])
        calls.append(seq)
        return {"status": "ok" if seq < 300 else "does not fit", "predicted_gib": seq / 100}

    monkeypatch.setattr(bench_memory, "_child", child)
    rows = bench_memory.run_memory_sweep(CONFIG, SMALL, mixers=["attention"], seqs=[512, 128, 256, 1024],
                                         remats=["none"], loss_chunks=[None], out_dir=tmp_path)
    assert calls == [128, 256, 512]  # increasing; 1024 never tried after 512 did not fit
    assert [r["status"] for r in rows] == ["ok", "ok", "does not fit"]
    assert bench_memory.longest_contexts(rows) == {"attention none chunk=—": 256}
    assert len(json.loads((tmp_path / "memory.json").read_text())["rows"]) == 3


def test_cli_sweeps_in_child_processes(tmp_path, capsys):
    assert main(["bench", "memory", CONFIG, *SMALL, "--mixers", "long_conv", "--seq", "64,128", "--remat", "full",
                 "--loss-chunk", "32", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["seq_len"], r["status"], r["loss_chunk"]) for r in rows] == [(64, "ok", 32), (128, "ok", 32)]
    assert (tmp_path / "memory.png").exists() and "long_conv full chunk=32: 128 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["bench", "memory", CONFIG, "--seq", "1k"])
    assert exited.value.code == 2 and "expected comma-separated positive integers, got '1k'" in capsys.readouterr().err
