"""Long convolutions, quality: does regularising the kernel (squash, smooth) help, and how close does it
get to attention? ("Simple Hardware-Efficient Long Convolutions", Fu et al. 2023.)

Trains every variant below on every task, several seeds each, with `longseq.train.train` (the same trainer
as `longseq train`), and reports the final evaluation accuracy as mean ± spread (min–max) over seeds:

    variants  long_conv (no regulariser), +squash, +smooth, +squash+smooth, gated_conv (H3/Hyena-style
              block, regularised), attention (Transformer), hybrid (gated conv + attention), learned
              butterfly (long conv, regularised, Monarch factors learned from the DFT)
    tasks     MQAR (associative recall) at growing sequence lengths, selective copying, ListOps

Every variant has the same width and depth (d_model 64, 2 layers, SwiGLU MLP); parameter counts are
printed beside the results (they differ by the mixers' own weights, see the table).

    PYTHONPATH=src python3 experiments/long_conv_quality/run.py --out experiments/long_conv_quality
    PYTHONPATH=src python3 experiments/long_conv_quality/run.py --tasks mqar_128 --seeds 0 --steps 50   # smoke

Writes OUT/results.json after every run (so a run cut short keeps what finished), OUT/results.md and
OUT/results.png at the end. `--jobs N` trains N runs at once in separate processes (on a GPU they share it:
the models are small; JAX's memory preallocation is switched off for them); `--gpus G` spreads those
processes over G GPUs of the host, round robin (each sees one through CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

REGULARISED = ["model.long_conv.squash_lambda=0.001", "model.long_conv.smooth_width=3"]
VARIANTS = {
    "long_conv": ["model.mixer=long_conv"],
    "long_conv+squash": ["model.mixer=long_conv", "model.long_conv.squash_lambda=0.001"],
    "long_conv+smooth": ["model.mixer=long_conv", "model.long_conv.smooth_width=3"],
    "long_conv+squash+smooth": ["model.mixer=long_conv", *REGULARISED],
    "gated_conv": ["model.mixer=gated_conv", *REGULARISED],
    "attention": ["model.mixer=attention", "optim.lr=3e-3"],
    "hybrid": ["model.mixer=hybrid", *REGULARISED, "optim.lr=3e-3"],
    "learned_butterfly": ["model.mixer=long_conv", *REGULARISED, "model.long_conv.learned_butterfly=true"],
}
TASKS = {
    "mqar_64": ["data.task=mqar", "data.seq_len=64", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=64"],
    "mqar_128": ["data.task=mqar", "data.seq_len=128", "data.mqar.num_kv_pairs=8", "data.mqar.vocab_size=64"],
    "mqar_256": ["data.task=mqar", "data.seq_len=256", "data.mqar.num_kv_pairs=16", "data.mqar.vocab_size=64"],
    "mqar_512": ["data.task=mqar", "data.seq_len=512", "data.mqar.num_kv_pairs=32", "data.mqar.vocab_size=128"],
    "selective_copying_256": ["data.task=selective_copying", "data.seq_len=256",
                              "data.selective_copying.num_tokens=16", "data.selective_copying.vocab_size=16"],
    "listops_512": ["data.task=listops", "data.seq_len=512", "data.listops.max_depth=9", "data.listops.max_args=10"],
}
BASE = ["model.d_model=64", "model.num_layers=2", "data.batch_size=32", "optim.lr=6e-3", "optim.warmup_steps=100",
        "train.progress=false"]


def run_one(task: str, variant: str, seed: int, steps: int, run_root: str) -> dict:
    from longseq.config import load_config
    from longseq.train import train

    overrides = [*BASE, *TASKS[task], *VARIANTS[variant], f"train.seed={seed}", f"data.seed={seed}",
                 f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                 f"train.run_dir={run_root}", f"train.name={task}-{variant}-{seed}"]
    config = load_config(None, overrides)
    start = time.perf_counter()
    result = train(config)
    return {"task": task, "variant": variant, "seed": seed, "steps": steps, "accuracy": result["accuracy"],
            "loss": result["loss"], "chance": result["chance_accuracy"], "seconds": time.perf_counter() - start,
            "params": _param_count(config)}


def _pin_worker(counter, gpus: int) -> None:
    """Process-pool initializer: this worker sees GPU (its start order mod gpus) only; runs before jax loads."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)


def _param_count(config) -> int:
    import jax

    from longseq import data as data_lib
    from longseq.train.trainer import Steps

    task = data_lib.make_task(config.data)
    return int(sum(x.size for x in jax.tree.leaves(Steps(config, task).abstract_state["params"])))


def summarise(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | params (first task) | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for variant in variants:
        cells = []
        for task in tasks:
            accs = [r["accuracy"] for r in rows if r["task"] == task and r["variant"] == variant]
            if not accs:
                cells.append("—")
                continue
            mean = statistics.mean(accs)
            cells.append(f"{100 * mean:.1f} ({100 * min(accs):.1f}–{100 * max(accs):.1f}, n={len(accs)})")
        params = next(r["params"] for r in rows if r["variant"] == variant)
        lines.append(f"| {variant} | {params:,} | " + " | ".join(cells) + " |")
    chance = {t: next(r["chance"] for r in rows if r["task"] == t) for t in tasks}
    lines.append("| chance | | " + " | ".join(f"{100 * chance[t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    figure = Figure(figsize=(max(6, 2.2 * len(tasks)), 4))
    axis = figure.subplots()
    width = 0.8 / len(variants)
    for v, variant in enumerate(variants):
        for t, task in enumerate(tasks):
            accs = [100 * r["accuracy"] for r in rows if r["task"] == task and r["variant"] == variant]
            if accs:
                x = t + (v - len(variants) / 2 + 0.5) * width
                axis.bar(x, statistics.mean(accs), width, color=f"C{v}", label=variant if t == 0 else None)
                axis.plot([x, x], [min(accs), max(accs)], color="black", linewidth=1)
    axis.set_xticks(range(len(tasks)), tasks, fontsize=8)
    axis.set_ylabel("eval accuracy, % (bar: mean over seeds, line: min–max)")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--gpus", type=int, default=0, help="spread the jobs over this many GPUs (0: leave as is)")
    parser.add_argument("--out", default="runs/long_conv_quality")
    args = parser.parse_args()
    if args.gpus < 0 or args.jobs < 1:
        parser.error(f"--jobs must be >= 1 and --gpus >= 0, got --jobs {args.jobs} --gpus {args.gpus}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(task, variant, seed) for task in args.tasks for seed in args.seeds for variant in args.variants]
    rows: list[dict] = []
    if args.jobs > 1:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # before the workers start: they inherit it
    context = multiprocessing.get_context("spawn")
    pinning = dict(initializer=_pin_worker, initargs=(context.Value("i", 0), args.gpus)) if args.gpus else {}
    with tempfile.TemporaryDirectory() as run_root, concurrent.futures.ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=context, **pinning) as pool:
        futures = [pool.submit(run_one, task, variant, seed, args.steps, run_root) for task, variant, seed in runs]
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows.append(row)
            print(f"RESULT {row['task']} {row['variant']} seed {row['seed']}: accuracy {row['accuracy']:.3f} "
                  f"({row['seconds']:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    order = {run: index for index, run in enumerate(runs)}
    rows.sort(key=lambda r: order[(r["task"], r["variant"], r["seed"])])
    table = summarise(rows)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
