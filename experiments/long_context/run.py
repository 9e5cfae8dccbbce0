"""Long context, end to end: tokens/s and memory of the Transformer, long-conv and hybrid LMs as the context grows.

For each mixer and sequence length, `longseq bench train` (one fixed batch of one sequence, the trainer's own
jitted step) on configs/bench_lm_370m.yaml with `model.mixer` and `data.seq_len` overridden; a length that runs
out of memory (or fails otherwise) is recorded with its error, and longer lengths of that mixer are skipped.

    PYTHONPATH=src python3 experiments/long_context/run.py --out experiments/long_context    # one GPU
    PYTHONPATH=src python3 experiments/long_context/run.py --seq 128 256 --small --out /tmp/lc   # CPU smoke

Writes OUT/long_context.json after every row and OUT/long_context.png (tokens/s and memory against the
context length, one line per mixer) at the end. Memory is XLA's estimate for each compiled step (arguments +
outputs + temporaries): the allocator's peak is the process's so far, which one process measuring many
configurations cannot reset.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIXERS = ("attention", "long_conv", "hybrid")
SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "model.mlp_hidden=128", "data.mqar.vocab_size=100"]


def measure(mixer: str, seq_len: int, small: bool, iters: int) -> dict:
    from longseq.bench.train import run_train_bench
    from longseq.config import load_config

    overrides = [f"model.mixer={mixer}", f"data.seq_len={seq_len}", "data.batch_size=1", *(SMALL if small else [])]
    config = load_config(ROOT / "configs" / "bench_lm_370m.yaml", overrides)
    try:
        return run_train_bench(config, iters=iters, warmup=2, matmul_size=256 if small else 8192)
    except Exception as error:  # noqa: BLE001 - out of memory, above all
        return {"mixer": mixer, "seq_len": seq_len, "error": f"{type(error).__name__}: {str(error)[:300]}"}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    speed, memory = figure.subplots(1, 2)
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        ok = [r for r in rows if r["mixer"] == mixer and "error" not in r]
        failed = [r for r in rows if r["mixer"] == mixer and "error" in r]
        if ok:
            line = speed.plot([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], marker="o", label=mixer)[0]
            memory.plot([r["seq_len"] for r in ok], [r["compiled_gib"] for r in ok],
                        marker="o", color=line.get_color(), label=mixer)
            for r in failed:
                speed.axvline(r["seq_len"], color=line.get_color(), linestyle=":", alpha=0.6)
    for axis, label in ((speed, "tokens/s (batch 1)"), (memory, "GiB of the compiled step (XLA's estimate)")):
        axis.set_xscale("log", base=2)
        axis.set(xlabel="context length (tokens)", ylabel=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("configs/bench_lm_370m.yaml by mixer; dotted: the first length that failed (out of memory)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument("--seq", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a tiny model (CPU smoke runs)")
    parser.add_argument("--out", default="runs/long_context")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for mixer in args.mixers:
        for seq_len in sorted(args.seq):
            row = measure(mixer, seq_len, args.small, args.iters)
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("mixer", "seq_len", "step_ms", "tokens_per_s", "mfu",
                                                      "peak_memory_gib", "error")}), flush=True)
            (out / "long_context.json").write_text(json.dumps(rows, indent=1) + "\n")
            gc.collect()
            if "error" in row:
                break  # longer contexts of this mixer will not fit either
    plot(rows, out / "long_context.png")


if __name__ == "__main__":
    main()
