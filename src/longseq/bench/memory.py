"""Memory sweep: `longseq bench memory CONFIG [overrides] --mixers … --seq … --remat … --loss-chunk …`.

For each mixer × remat policy × loss chunk (a *series*), the contexts in increasing order at batch 1, each
configuration in a fresh process (the allocator's peak is per process, and an out-of-memory must not
poison the next one):

    1. compile the train step from shapes and read the trainer's memory report (`longseq.train.memory`);
    2. where the report says it cannot fit the device, record "does not fit" (nothing is allocated);
    3. else run `warmup` + `iters` steps (`longseq.bench.train.prepare_step`) and read the device's peak.

A series stops at its first context that does not fit or fails. Row: mixer, remat, loss_chunk, seq_len,
status (ok | does not fit | error), predicted_gib (the report's total), peak_gib (the allocator's peak;
None on CPU), predicted / peak, host_gib (offloaded to pinned host memory), step_ms, tokens_per_s. Writes memory.json after every row, then memory.md
and memory.png (peak memory against context, one line per series).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30


def measure(config_path: str | None, overrides: list[str], *, iters: int, warmup: int) -> dict[str, Any]:
    """One configuration in this process (step 1–3 of the module docstring)."""
    import jax

    from longseq.bench.timing import time_calls
    from longseq.bench.train import prepare_step
    from longseq.config import load_config
    from longseq.train.memory import DoesNotFit

    config = load_config(config_path, overrides)
    row: dict[str, Any] = {"mixer": config.model.mixer, "remat": config.train.remat,
                           "loss_chunk": config.train.loss_chunk, "seq_len": config.data.seq_len,
                           "batch": config.data.batch_size, "device_kind": jax.devices()[0].device_kind}
    try:
        step = prepare_step(config)
    except DoesNotFit as refused:
        return {**row, "status": "does not fit", "predicted_gib": refused.report.total / GIB,
                "host_gib": refused.report.host / GIB}
    seconds = time_calls(step.call, iters=iters, warmup=warmup).median_ms * 1e-3
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None
    predicted = step.memory.total / GIB
    tokens = config.data.batch_size * config.data.seq_len
    return {**row, "status": "ok", "predicted_gib": predicted, "peak_gib": peak, "host_gib": step.memory.host / GIB,
            "predicted_over_peak": None if not peak else predicted / peak,
            "temporaries_gib": step.memory.temporaries / GIB, "params": step.num_params,
            "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds}


def series_overrides(mixer: str, remat: str, chunk: int | None, seq: int, remat_save: list[str]) -> list[str]:
    """The overrides of one configuration of a series; `remat_save` goes to the policies that read it."""
    overrides = [f"model.mixer={mixer}", f"data.seq_len={seq}", "data.batch_size=1", f"train.remat={remat}",
                 f"train.loss_chunk={chunk if chunk else 'null'}"]
    if remat in ("save_named", "offload"):
        overrides.append(f"train.remat_save=[{','.join(remat_save)}]")
    return overrides


def run_memory_sweep(config_path: str | None, overrides: list[str], *, mixers: list[str], seqs: list[int],
                     remats: list[str], loss_chunks: list[int | None], remat_save: list[str] = ("block_input",),
                     iters: int = 2, warmup: int = 1, out_dir: str | Path,
                     timeout_s: float = 900) -> list[dict[str, Any]]:
    """Every series (module docstring), each configuration in a child process; memory.json after every row.
    `remat_save` names what the save_named and offload series keep (train.remat_save)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for mixer in mixers:
        for remat in remats:
            for chunk in loss_chunks:
                for seq in sorted(seqs):
                    series = series_overrides(mixer, remat, chunk, seq, list(remat_save))
                    row = _child(config_path, [*overrides, *series], iters, warmup, timeout_s)
                    row.update(mixer=mixer, remat=remat, loss_chunk=chunk, seq_len=seq)
                    rows.append(row)
                    (out / "memory.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
                    print(format_line(row), flush=True)
                    if row["status"] != "ok":
                        break
    return rows


def _child(config_path, overrides, iters, warmup, timeout_s) -> dict[str, Any]:
    """`measure` in a fresh Python process; a crash or out-of-memory becomes an error row."""
    command = [sys.executable, "-m", "longseq.bench.memory", json.dumps([config_path, overrides, iters, warmup])]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return {**json.loads(line[4:]), "wall_s": time.perf_counter() - start}
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"status": "error", "error": " / ".join(tail)[-400:], "wall_s": time.perf_counter() - start}


def format_line(row: dict[str, Any]) -> str:
    def num(key, spec):
        return "—" if row.get(key) is None else format(row[key], spec)

    return (f"| {row['mixer']} | {row['remat']} | {row['loss_chunk'] or '—'} | {row['seq_len']:,} | {row['status']} | "
            f"{num('predicted_gib', '.2f')} | {num('peak_gib', '.2f')} | {num('predicted_over_peak', '.3f')} | "
            f"{num('host_gib', '.2f') if row.get('host_gib') else '—'} | "
            f"{num('step_ms', '.0f')} | {num('tokens_per_s', ',.0f')} |")


HEADER = ("| mixer | remat | loss chunk | context | status | predicted GiB | peak GiB | predicted / peak | "
          "host GiB | step ms | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def longest_contexts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The longest context that ran, per series ('mixer remat chunk')."""
    best: dict[str, int] = {}
    for row in rows:
        if row["status"] == "ok":
            key = f"{row['mixer']} {row['remat']} chunk={row['loss_chunk'] or '—'}"
            best[key] = max(best.get(key, 0), row["seq_len"])
    return best


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER, *(format_line(row) for row in rows), "",
             "Longest context that ran, per series (a series stops at its first refusal or failure, or at the end of "
             "its contexts):", ""]
    lines += [f"- {key}: {seq:,} tokens" for key, seq in longest_contexts(rows).items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory (left) and tokens/s (right) against context, one line per series; x marks the predicted
    memory of a context refused because it cannot fit."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(11, 4.5))
    memory_axes, speed_axes = figure.subplots(1, 2)
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(f"{row['mixer']} {row['remat']} chunk={row['loss_chunk'] or '—'}", []).append(row)
    for name, points in series.items():
        ok = [p for p in points if p["status"] == "ok"]
        if not ok:
            continue
        value = lambda p: p.get("peak_gib") or p["predicted_gib"]  # noqa: E731 - CPU rows have no peak
        line = memory_axes.plot([p["seq_len"] for p in ok], [value(p) for p in ok], marker="o", label=name)[0]
        refused = [p for p in points if p["status"] == "does not fit"]
        memory_axes.plot([p["seq_len"] for p in refused], [p["predicted_gib"] for p in refused], "x", markersize=9,
                         color=line.get_color())
        speed_axes.plot([p["seq_len"] for p in ok], [p["tokens_per_s"] for p in ok], marker="o", label=name,
                        color=line.get_color())
    memory_axes.set(yscale="log", ylabel="peak memory (GiB)", title="memory of one train step (x: predicted, refused)")
    speed_axes.set(yscale="log", ylabel="tokens/s", title="training throughput")
    contexts = sorted({row["seq_len"] for row in rows})
    for axes in (memory_axes, speed_axes):
        axes.set(xscale="log", xlabel="context (tokens, batch 1)")
        axes.set_xticks(contexts, [f"{n // 1024}K" if n >= 1024 else str(n) for n in contexts])
        axes.xaxis.set_minor_formatter(NullFormatter())
    memory_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":  # the child of `_child`: one configuration, one ROW line
    config_path, overrides, iters, warmup = json.loads(sys.argv[1])
    print("ROW " + json.dumps(measure(config_path, overrides, iters=iters, warmup=warmup)), flush=True)
