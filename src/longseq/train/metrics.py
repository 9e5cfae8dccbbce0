"""Where training metrics go: `metrics.jsonl`, TensorBoard event files, and a PNG plot at the end.

Each metrics row is {"step": int, "split": "train"|"eval", name: float, ...}. On resume from step s,
rows after s (written by the interrupted run, about to be recomputed) are dropped from the JSONL file
and TensorBoard is told to purge them, so both show one clean history.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends metric rows to `run_dir/metrics.jsonl` and to TensorBoard under `run_dir/tensorboard/`."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._file = self.path.open("a")
        self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()


def plot_metrics(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Loss and accuracy against step, train and eval, as one PNG."""
    # A bare Figure (no pyplot) leaves the global backend alone: a notebook's inline plots keep working.
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    figure = Figure(figsize=(11, 4))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for split, style in (("train", "-"), ("eval", "o-")):
        split_rows = [r for r in rows if r["split"] == split]
        steps = [r["step"] for r in split_rows]
        loss_axis.plot(steps, [r["loss"] for r in split_rows], style, label=split, markersize=4)
        accuracy_axis.plot(steps, [r["accuracy"] for r in split_rows], style, label=split, markersize=4)
    chance = next((r["chance_accuracy"] for r in rows if "chance_accuracy" in r), None)
    if chance is not None:
        accuracy_axis.axhline(chance, color="gray", linestyle="--", label="chance")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    accuracy_axis.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=110)
    return out_path
