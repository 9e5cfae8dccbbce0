"""Redraw the long-context figure and table from a `longseq bench memory` JSON (rows of several calls).

    PYTHONPATH=src python3 experiments/long_context/plot.py experiments/long_context/memory_h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from longseq.bench.memory import markdown, plot

source = Path(sys.argv[1])
rows = json.loads(source.read_text())["rows"]
plot(rows, source.with_suffix(".png"))
source.with_suffix(".md").write_text(markdown(rows))
print(markdown(rows))
