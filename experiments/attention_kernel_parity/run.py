"""Train the same Transformer LM twice, with the reference attention and with the Pallas kernel,
and compare the loss curves (same initialisation, same batches).

    python experiments/attention_kernel_parity/run.py [--steps 300] [--out DIR] [overrides...]

Writes parity.json (both curves, the largest relative gap) and parity.png to --out and prints a
summary. On a GPU the kernel is Triton; elsewhere it runs in interpret mode (slow: use few steps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from longseq.config import load_config
from longseq.train import train
from longseq.train.metrics import read_metrics

BASE = Path(__file__).resolve().parents[2] / "configs" / "mqar_attention.yaml"


def train_curve(impl: str, steps: int, out: Path, overrides: list[str]) -> dict[int, float]:
    config = load_config(BASE, [f"train.steps={steps}", "train.log_every=10", f"train.eval_every={steps}",
                                f"train.checkpoint_every={steps}", f"train.run_dir={out}", f"train.name={impl}",
                                "train.progress=false", f"kernels.attention={impl}", *overrides])
    run_dir = train(config)["run_dir"]
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/attention_kernel_parity"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. model.compute_dtype=bfloat16")
    args = parser.parse_args()
    curves = {impl: train_curve(impl, args.steps, args.out, args.overrides) for impl in ("reference", "pallas")}
    steps = sorted(curves["reference"])
    gaps = [abs(curves["pallas"][s] - curves["reference"][s]) / abs(curves["reference"][s]) for s in steps]
    summary = dict(overrides=args.overrides, steps=steps, curves={k: [v[s] for s in steps] for k, v in curves.items()},
                   max_relative_gap=max(gaps), final_loss={k: v[steps[-1]] for k, v in curves.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(summary, indent=1))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for impl, style in (("reference", "-"), ("pallas", "--")):
        ax.plot(steps, summary["curves"][impl], style, label=impl)
    ax.set(xlabel="step", ylabel="train loss", title="Transformer LM on MQAR: attention impl parity")
    ax.legend()
    fig.savefig(args.out / "parity.png", dpi=120)
    print(f"final loss: reference {summary['final_loss']['reference']:.4f}  pallas {summary['final_loss']['pallas']:.4f}"
          f"  largest relative gap over {len(steps)} logged steps: {summary['max_relative_gap']:.2e}")


if __name__ == "__main__":
    main()
