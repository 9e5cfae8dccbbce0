"""Induction heads: after `trigger x ... trigger`, predict `x`.

Vocabulary (`vocab_size` = V): 0 is padding (never produced), 1 .. V-2 are ordinary tokens, and
V-1 is the trigger.

Sequence of length L (L >= 3): ordinary tokens drawn uniformly from [1, V-1); the trigger at one
position t drawn uniformly from [0, L-3], followed by an ordinary token x (uniform, as every other
filler token); and the trigger again at the last position L-1. The trigger appears exactly twice.

Targets and weights: the target at the last position is x, with weight 1; every other position has
target 0 and weight 0.

Chance accuracy: uniform guessing among the ordinary tokens, 1 / (V - 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longseq.data.task import Split, Task, lm_batch


class InductionHeadsTask(Task):
    name = "induction_heads"
    kind = "lm"

    def __init__(self, seq_len: int, seed: int, vocab_size: int = 16) -> None:
        super().__init__(seq_len, seed)
        if vocab_size < 3:
            raise ValueError(f"data.induction_heads.vocab_size: must be >= 3 (pad, trigger, one token), "
                             f"got {vocab_size}")
        if seq_len < 3:
            raise ValueError(f"data.seq_len: {seq_len} is too short for induction_heads; it needs at least 3")
        self.vocab_size = int(vocab_size)
        self.trigger = self.vocab_size - 1
        self.num_ordinary = self.vocab_size - 2
        self.chance_accuracy = 1.0 / self.num_ordinary

    @classmethod
    def from_config(cls, config: Any, run_dir: Path | None = None) -> "InductionHeadsTask":
        return cls(config.seq_len, config.seed, vocab_size=config.induction_heads.vocab_size)

    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        B, L = batch_size, self.seq_len
        rows = np.arange(B)
        inputs = rng.integers(1, self.trigger, size=(B, L))
        first = rng.integers(0, L - 2, size=B)          # first trigger at 0 .. L-3
        inputs[rows, first] = self.trigger
        inputs[:, -1] = self.trigger
        targets = np.zeros((B, L), dtype=np.int32)
        targets[:, -1] = inputs[rows, first + 1]
        weights = np.zeros((B, L), dtype=np.float32)
        weights[:, -1] = 1.0
        return lm_batch(inputs, targets, weights)
