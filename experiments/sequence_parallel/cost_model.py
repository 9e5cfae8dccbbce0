"""The sequence-parallel cost model (longseq.parallel.cost) against measurements, and where each strategy wins.

1. Predicted vs measured: every sequence-parallel row of `longseq bench parallel` JSONs (default the
   2× H200 tables in docs/parallel_h200x2.json: four strategies, 64K–256K;
   docs/parallel_h200x2_family.json: all six and attention2d+kept, 64K–256K; and
   docs/parallel_h200x2_64k_repeat.json). The model's chip throughput is the same run's
   single-device cuDNN row for the same problem (what `attention_flops` stands for); the link is the
   anchors' measured NVLink ppermute, 307 GB/s. Prints each row's predicted and measured ms, the rank
   correlation, and per problem the strategy `auto` would pick against the fastest measured.
2. A sweep of P = 4 … 1024 at one problem (default N = 1M tokens, 32 heads × 128, causal, bf16) on
   H100 nodes (8 GPUs, NVLink 307 GB/s, InfiniBand 50 GB/s per GPU): predicted time of each strategy
   on its best grid, and the bytes each device sends beside ATTENTION2D's O(N·d/√P).

    PYTHONPATH=src python3 experiments/sequence_parallel/cost_model.py --out experiments/sequence_parallel
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from longseq.parallel import cost

ROOT = Path(__file__).resolve().parents[2]


def validate(runs: dict[str, list[dict]]) -> tuple[list[dict], str]:
    """Predicted vs measured for every sp_* row that ran, each run against its own single-device
    row; the markdown report. runs: {name: rows of one `longseq bench parallel` JSON}."""
    baseline = {(run, r["N"], r["H"], r["D"], r["causal"]): r for run, rows in runs.items() for r in rows
                if r["impl"].startswith("single_device_") and r["tflops"]}
    out = []
    for run, row in ((run, row) for run, rows in runs.items() for row in rows):
        if not row["impl"].startswith("sp_") or row["ms"] is None:
            continue
        single = baseline.get((run, row["N"], row["H"], row["D"], row["causal"]))
        if single is None:
            continue
        system = cost.System(attention_flops=single["tflops"] * 1e12, intra_bandwidth=307e9, inter_bandwidth=50e9,
                             node_size=8, memory=141e9)
        problem = cost.Problem(row["B"], row["N"], row["H"], row["H"], row["D"], 2, row["causal"])
        grid = tuple(int(x) for x in row["grid"].split("x"))
        kept = row.get("keep_gathered", False)
        predicted = cost.predict(row["strategy"], grid, problem, system, keep_gathered=kept)
        out.append({"run": run, "strategy": row["strategy"] + ("+kept" if kept else ""), "keep_gathered": kept,
                    "grid": row["grid"], "N": row["N"], "causal": row["causal"],
                    "measured_ms": row["ms"], "predicted_ms": predicted.time * 1e3,
                    "predicted_over_measured": predicted.time * 1e3 / row["ms"]})
    rho = cost.rank_correlation([r["predicted_ms"] for r in out], [r["measured_ms"] for r in out])
    lines = ["| run | N | causal | strategy | grid | measured ms | predicted ms | predicted/measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['run']} | {r['N']} | {'yes' if r['causal'] else 'no'} | {r['strategy']} | {r['grid']} | "
                     f"{r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {r['predicted_over_measured']:.3f} |")
    lines += ["", f"Spearman rank correlation over the {len(out)} rows: {rho:.3f}; within each run and problem:", ""]
    for key in sorted({(r["run"], r["N"], r["causal"]) for r in out}):
        group = [r for r in out if (r["run"], r["N"], r["causal"]) == key]
        lines[-1] += f" {key[0]} N={key[1]} {'causal' if key[2] else 'full'}: " + \
            f"{cost.rank_correlation([r['predicted_ms'] for r in group], [r['measured_ms'] for r in group]):.2f};"
    lines += ["", "auto's pick among what ran (the +kept rows count as the pick of keep_gathered=true, which only "
              "attention2d has):", "",
              "| run | N | causal | keep_gathered | auto picks (predicted) | its measured ms | fastest measured | ms | auto / fastest |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run, n, causal in sorted({(r["run"], r["N"], r["causal"]) for r in out}):
        problem_rows = [r for r in out if (r["run"], r["N"], r["causal"]) == (run, n, causal)]
        for kept in sorted({r["keep_gathered"] for r in problem_rows}):
            # what auto chooses among with model.attention_keep_gathered = kept
            group = [r for r in problem_rows if r["keep_gathered"] == kept or
                     (kept and not r["keep_gathered"] and r["strategy"] != "attention2d")]
            key = (run, n, causal, kept)
            picked = min(group, key=lambda r: r["predicted_ms"])
            best = min(group, key=lambda r: r["measured_ms"])
            lines.append(f"| {key[0]} | {key[1]} | {'yes' if key[2] else 'no'} | {'true' if key[3] else 'false'} | "
                         f"{picked['strategy']} {picked['grid']} | "
                         f"{picked['measured_ms']:.2f} | {best['strategy']} {best['grid']} | {best['measured_ms']:.2f} | "
                         f"{picked['measured_ms'] / best['measured_ms']:.3f} |")
    return out, "\n".join(lines)


def sweep(seq: int, heads: int, system: cost.System, devices=(4, 8, 16, 32, 64, 128, 256, 512, 1024)):
    """Per strategy: [(P, best grid, predicted seconds, bytes sent per device)]."""
    problem = cost.Problem(1, seq, heads, heads, 128, 2, True)
    curves = {}
    for strategy in cost.STRATEGIES:
        points = []
        for P in devices:
            found = [p for p in cost.candidates(P, problem, system, (strategy,), memory_budget=math.inf)]
            if found:
                best = found[0]
                points.append((P, f"{best.grid[0]}x{best.grid[1]}", best.time, best.bytes_sent))
        curves[strategy] = points
    return problem, curves


def plot(curves, problem, system, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.6))
    left, right = figure.subplots(1, 2)
    for strategy, points in curves.items():
        if not points:
            continue
        Ps = [p[0] for p in points]
        left.plot(Ps, [p[2] * 1e3 for p in points], marker="o", markersize=3, label=strategy)
        right.plot(Ps, [p[3] / 2**20 for p in points], marker="o", markersize=3, label=strategy)
    Ps = sorted({p[0] for points in curves.values() for p in points})
    compute = [problem.flops() / P / system.attention_flops * 1e3 for P in Ps]
    left.plot(Ps, compute, ":", color="gray", label="attention compute alone")
    d = problem.heads * problem.head_dim
    # ATTENTION2D's claim: O(N·d/√P) per device; drawn through the best attention2d point at the first P.
    first = curves["attention2d"][0]
    scale = first[3] / (problem.seq * d / math.sqrt(first[0]))
    right.plot(Ps, [scale * problem.seq * d / math.sqrt(P) / 2**20 for P in Ps], ":", color="gray",
               label="∝ N·d/√P (ATTENTION2D)")
    for axis, label in ((left, "predicted fwd+bwd ms (fastest grid)"), (right, "MiB sent per device (fastest grid)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set(xlabel="devices P", ylabel=label)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.suptitle(f"N = {problem.seq}, {problem.heads} heads × {problem.head_dim}, causal, bf16; nodes of "
                    f"{system.node_size} (NVLink {system.intra_bandwidth / 1e9:.0f} GB/s, across nodes "
                    f"{system.inter_bandwidth / 1e9:.0f} GB/s per GPU)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", nargs="+", default=[str(ROOT / "docs" / name) for name in (
        "parallel_h200x2.json", "parallel_h200x2_family.json", "parallel_h200x2_64k_repeat.json")])
    parser.add_argument("--seq", type=int, default=1 << 20)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--out", default=None, help="folder for cost_model.json / cost_model.md / cost_model_sweep.png")
    args = parser.parse_args()

    runs = {Path(path).stem: json.loads(Path(path).read_text())["rows"] for path in args.measured}
    compared, report = validate(runs)
    system = cost.SYSTEMS["h100"]
    problem, curves = sweep(args.seq, args.heads, system)
    sweep_lines = ["| P | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for index, P in enumerate(p[0] for p in curves["ring"]):
        cells = []
        for strategy in curves:
            point = next((p for p in curves[strategy] if p[0] == P), None)
            cells.append("—" if point is None else f"{point[2] * 1e3:.0f} ms ({point[1]})")
        sweep_lines.append(f"| {P} | " + " | ".join(cells) + " |")
    shown = ", ".join(str(Path(p).resolve().relative_to(ROOT)) if Path(p).resolve().is_relative_to(ROOT) else p
                      for p in args.measured)
    text = (f"## Predicted vs measured ({shown})\n\n{report}\n\n## Sweep over P (H100 nodes, predicted)\n\n"
            + "\n".join(sweep_lines) + "\n")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_model.md").write_text(text)
        (out / "cost_model.json").write_text(json.dumps({"compared": compared, "sweep": curves}, indent=1) + "\n")
        plot(curves, problem, system, out / "cost_model_sweep.png")
        print(f"wrote {out}/cost_model.md, cost_model.json, cost_model_sweep.png")


if __name__ == "__main__":
    main()
