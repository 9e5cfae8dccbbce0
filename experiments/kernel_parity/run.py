"""Train the same model twice, with an op's reference implementation and with its kernel, and compare
the loss curves (same initialisation, same batches).

    python experiments/kernel_parity/run.py --op attention [--steps 300] [--out DIR] [overrides...]
    python experiments/kernel_parity/run.py --op long_conv [--steps 300] [--out DIR] [overrides...]

--op attention: configs/mqar_attention.yaml, kernels.attention = reference vs pallas.
--op long_conv: configs/text_hybrid.yaml with long-conv and gated-conv layers only (byte-level text LM),
                kernels.long_conv = fft vs monarch (on Hopper the Mosaic GPU kernels for bf16 seq 513 … 4096;
                else the fused Pallas kernel where the padded length is 512 … 8192; the Monarch einsums
                elsewhere).

Writes parity.json (both curves, the largest relative gap) and parity.png to --out and prints a summary.
On a GPU the kernels are compiled; elsewhere they run in interpret mode (slow: use few steps and small sizes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from longseq.config import load_config
from longseq.train import train
from longseq.train.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# op -> (base config, its overrides, the kernels key, (reference impl, kernel impl), plot title)
OPS = {
    "attention": (CONFIGS / "mqar_attention.yaml", [], "kernels.attention", ("reference", "pallas"),
                  "Transformer LM on MQAR"),
    "long_conv": (CONFIGS / "text_hybrid.yaml", ["model.hybrid_pattern=[gated_conv,long_conv]"],
                  "kernels.long_conv", ("fft", "monarch"), "long-conv LM on text"),
}


def train_curve(op: str, impl: str, steps: int, out: Path, overrides: list[str]) -> dict[int, float]:
    base, base_overrides, key, _, _ = OPS[op]
    config = load_config(base, [*base_overrides, f"train.steps={steps}", "train.log_every=10",
                                f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                                f"train.run_dir={out}", f"train.name={impl}", "train.progress=false",
                                f"{key}={impl}", *overrides])
    run_dir = train(config)["run_dir"]
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), default="attention")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="default runs/kernel_parity/OP")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. model.compute_dtype=bfloat16")
    args = parser.parse_args()
    out = args.out or Path("runs/kernel_parity") / args.op
    reference, kernel = OPS[args.op][3]
    curves = {impl: train_curve(args.op, impl, args.steps, out, args.overrides) for impl in (reference, kernel)}
    steps = sorted(curves[reference])
    gaps = [abs(curves[kernel][s] - curves[reference][s]) / abs(curves[reference][s]) for s in steps]
    summary = dict(op=args.op, overrides=args.overrides, steps=steps,
                   curves={k: [v[s] for s in steps] for k, v in curves.items()},
                   max_relative_gap=max(gaps), final_loss={k: v[steps[-1]] for k, v in curves.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(summary, indent=1))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for impl, style in ((reference, "-"), (kernel, "--")):
        ax.plot(steps, summary["curves"][impl], style, label=impl)
    ax.set(xlabel="step", ylabel="train loss", title=f"{OPS[args.op][4]}: {args.op} impl parity")
    ax.legend()
    fig.savefig(out / "parity.png", dpi=120)
    print(f"final loss: {reference} {summary['final_loss'][reference]:.4f}  {kernel} {summary['final_loss'][kernel]:.4f}"
          f"  largest relative gap over {len(steps)} logged steps: {summary['max_relative_gap']:.2e}")


if __name__ == "__main__":
    main()
