"""Selective copying, as in the Mamba paper (Gu & Dao 2023).

Vocabulary (`vocab_size` = V): 0 padding (never produced), 1 noise (blank), 2 copy marker, and
3 .. V-1 the data tokens (V - 3 of them).

Sequence of length L with `num_tokens` = N data tokens (L >= 2N):

- positions 0 .. L-N-1 (the prefix): N data tokens, each uniform over the data vocabulary (repeats
  allowed), at N distinct uniformly random positions kept in increasing order; noise elsewhere;
- positions L-N .. L-1: N copy markers.

Targets and weights: the target at the j-th marker position (L-N+j) is the j-th data token of the
prefix, in order of position. There is no extra next-token shift: the model reads marker j and
emits data token j at that same position. Weights are 1 on the N marker positions, 0 elsewhere
(target 0 there).

Chance accuracy: uniform guessing among the data tokens, 1 / (V - 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longseq.data.task import Split, Task, lm_batch

NOISE = 1
MARKER = 2
FIRST_DATA = 3


class SelectiveCopyingTask(Task):
    name = "selective_copying"
    kind = "lm"

    def __init__(self, seq_len: int, seed: int, vocab_size: int = 16, num_tokens: int = 16) -> None:
        super().__init__(seq_len, seed)
        if vocab_size < 4:
            raise ValueError(f"data.selective_copying.vocab_size: must be >= 4 (pad, noise, marker and at "
                             f"least one data token), got {vocab_size}")
        if num_tokens < 1:
            raise ValueError(f"data.selective_copying.num_tokens: must be >= 1, got {num_tokens}")
        if seq_len < 2 * num_tokens:
            raise ValueError(f"data.seq_len: {seq_len} is too short for selective_copying with "
                             f"num_tokens={num_tokens}; it needs at least {2 * num_tokens}")
        self.vocab_size = int(vocab_size)
        self.num_tokens = int(num_tokens)
        self.num_data = self.vocab_size - FIRST_DATA
        self.chance_accuracy = 1.0 / self.num_data

    @classmethod
    def from_config(cls, config: Any, run_dir: Path | None = None) -> "SelectiveCopyingTask":
        o = config.selective_copying
        return cls(config.seq_len, config.seed, vocab_size=o.vocab_size, num_tokens=o.num_tokens)

    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        B, L, N = batch_size, self.seq_len, self.num_tokens
        prefix = L - N
        rows = np.arange(B)[:, None]
        positions = np.sort(np.argsort(rng.random((B, prefix)), axis=1)[:, :N], axis=1)
        data = rng.integers(FIRST_DATA, self.vocab_size, size=(B, N))
        inputs = np.full((B, L), NOISE, dtype=np.int32)
        inputs[rows, positions] = data
        inputs[:, prefix:] = MARKER
        targets = np.zeros((B, L), dtype=np.int32)
        targets[:, prefix:] = data
        weights = np.zeros((B, L), dtype=np.float32)
        weights[:, prefix:] = 1.0
        return lm_batch(inputs, targets, weights)
