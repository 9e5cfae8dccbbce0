"""What every `longseq bench` command writes, and the table the attention benchmarks share.

`save_outputs` puts NAME.json ({"meta", "rows"}, strict JSON), NAME.md (a header, then the markdown table)
and NAME.png (the command's plot) in one folder. `attention_problem_lines` lays rows out one line per
attention problem (B, N, H, D, dtype, causal, pass) and one column per implementation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN/inf (e.g. the rel_err of a kernel that returns NaN) as strings: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def save_outputs(name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any], markdown: str,
                 plot: Callable[[Sequence[dict[str, Any]], Path], Any], out_dir: str | Path) -> dict[str, Path]:
    """NAME.json, NAME.md (markdown) and NAME.png (plot(rows, path)) in out_dir (created); their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{name}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(json_safe({"meta": meta, "rows": list(rows)}), indent=1) + "\n")
    paths["md"].write_text(markdown)
    plot(rows, paths["png"])
    return paths


def attention_problem_lines(rows: Sequence[dict[str, Any]], cell: Callable[[dict | None], str]) -> list[str]:
    """A markdown table: one line per (B, N, H, D, dtype, causal, pass), a column per implementation (in
    the rows' order) holding cell(its row, or None)."""
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    by_problem: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["B"], row["N"], row["H"], row["D"], row["dtype"], row["causal"], row["pass"])
        by_problem.setdefault(key, {})[row["impl"]] = row
    header = ["B", "N", "H", "D", "dtype", "causal", "pass", *impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (batch, seq_len, heads, head_dim, dtype, causal, pass_), cells in by_problem.items():
        values = [str(batch), str(seq_len), str(heads), str(head_dim), dtype, "yes" if causal else "no", pass_,
                  *(cell(cells.get(impl)) for impl in impls)]
        lines.append("| " + " | ".join(values) + " |")
    return lines
