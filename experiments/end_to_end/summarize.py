"""Table and plot of `longseq bench train` rows beside the anchor's, from one device call.

    PYTHONPATH=src python3 experiments/end_to_end/summarize.py experiments/end_to_end

reads DIR/anchor.json (../shared/anchors/train_mfu_anchor.py's rows) and DIR/*/train.json (one
`longseq bench train` row each), prints the markdown table and writes DIR/end_to_end.png.
"""

import json
import sys
from pathlib import Path


def load(folder: Path):
    anchor = [r for r in json.loads((folder / "anchor.json").read_text()) if r.get("kind") == "train_step"
              and "error" not in r]
    ours = sorted((json.loads(p.read_text()) | {"name": p.parent.name} for p in folder.glob("*/train.json")),
                  key=lambda r: (r["mixer"] != "attention", r["seq_len"], r["batch"]))
    return anchor, ours


def table(anchor, ours) -> str:
    best_anchor = {}
    for r in anchor:
        key = (r["B"], r["T"])
        if key not in best_anchor or r["tokens_per_s"] > best_anchor[key]["tokens_per_s"]:
            best_anchor[key] = r
    lines = ["| run | mixer | params | batch × seq | step ms | tokens/s | model TFLOP/s | MFU (of 989) | of matmul ceiling "
             "| peak GiB | anchor, same batch × seq | ours / anchor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ours:
        a = best_anchor.get((r["batch"], r["seq_len"])) if r["mixer"] == "attention" else None
        anchor_cell = "—" if a is None else (f"{a['tokens_per_s']:,.0f} tok/s, {100 * a['mfu_vs_989']:.1f}% "
                                            f"(remat {a['remat'] or 'none'}, {a['peak_gib']:.0f} GiB)")
        ratio = "—" if a is None else f"{r['tokens_per_s'] / a['tokens_per_s']:.2f}×"
        lines.append(f"| {r['name']} | {r['mixer']} | {r['params'] / 1e6:.0f}M | {r['batch']} × {r['seq_len']} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {100 * r['matmul_fraction']:.1f}% | {r['peak_memory_gib']:.1f} | "
                     f"{anchor_cell} | {ratio} |")
    lines += ["", "The anchor's own rows (same call):", "",
              "| batch × seq | remat | step ms | tokens/s | model TFLOP/s | MFU (of 989) | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for a in anchor:
        lines.append(f"| {a['B']} × {a['T']} | {a['remat'] or 'none'} | {a['step_ms']:.1f} | {a['tokens_per_s']:,.0f} | "
                     f"{a['model_tflops']:.0f} | {100 * a['mfu_vs_989']:.1f}% | {a['peak_gib']:.1f} |")
    return "\n".join(lines)


def plot(anchor, ours, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    labels = [f"longseq {r['mixer']}\n{r['batch']}×{r['seq_len'] // 1024}K" for r in ours] + \
             [f"anchor{' remat ' + a['remat'] if a['remat'] else ''}\n{a['B']}×{a['T'] // 1024}K" for a in anchor]
    values = [100 * r["mfu"] for r in ours] + [100 * a["mfu_vs_989"] for a in anchor]
    colors = ["tab:blue"] * len(ours) + ["tab:gray"] * len(anchor)
    axis.bar(range(len(values)), values, color=colors)
    axis.set_xticks(range(len(values)), labels, fontsize=6, rotation=60, ha="right")
    axis.axhline(45, color="tab:red", linestyle=":", label="issue target 45%")
    axis.set_ylabel("model FLOPs utilisation, % of 989 TFLOP/s")
    axis.set_title(f"~370M-param LMs, one {ours[0]['device_kind']}, jax {ours[0]['jax']}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    anchor, ours = load(folder)
    print(table(anchor, ours))
    plot(anchor, ours, folder / "end_to_end.png")
