"""Multi-query associative recall (MQAR), after Zoology (Arora et al. 2023).

Vocabulary (`vocab_size` = V, `num_kv_pairs` = N):

- 0 is padding (never produced by this task);
- key tokens are [1, V // 2), value tokens are [V // 2, V) -- disjoint halves, as in Zoology.

Sequence of length L:

- positions 0 .. 2N-1: the N key-value pairs `k1 v1 k2 v2 ... kN vN`; keys are distinct and values
  are distinct within a sequence (both sampled without replacement, as in Zoology);
- positions 2N .. L-1: every key appears exactly once more, as a query, at an even offset
  `2N + 2 * gap`. The gaps are Zoology's power law: N distinct gaps from range((L - 2N) // 2) drawn
  without replacement with probability proportional to (gap + 1) ** (power_a - 1), power_a = 0.01
  (so most queries land near the pairs, a heavy tail reaches the end); the i-th drawn gap goes to the
  i-th pair, like Zoology's sequential draw;
- every other position holds a noise token drawn uniformly from [1, V) *minus this sequence's keys*.
  Zoology draws noise from the whole vocabulary; excluding the sequence's own keys guarantees that
  the only earlier occurrence of a query's key is in the pair prefix, so every query has exactly one
  correct answer (the task stays solvable with noise as hard as Zoology's otherwise).

Targets and weights: at each query position the target is the value bound to the query key
(predicted *at* the query position, i.e. Zoology's labels after its shift); weights are 1 exactly at
the N query positions. Everywhere else targets are 0 and weights 0.

Chance accuracy: uniform guessing among the value tokens, 1 / (V - V // 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longseq.data.task import Split, Task, lm_batch

POWER_A = 0.01  # Zoology's default exponent of the query-gap power law


class MQARTask(Task):
    name = "mqar"
    kind = "lm"

    def __init__(self, seq_len: int, seed: int, vocab_size: int = 64, num_kv_pairs: int = 8,
                 power_a: float = POWER_A) -> None:
        super().__init__(seq_len, seed)
        if num_kv_pairs < 1:
            raise ValueError(f"data.mqar.num_kv_pairs: must be >= 1, got {num_kv_pairs}")
        if vocab_size // 2 - 1 < num_kv_pairs:
            raise ValueError(f"data.mqar.vocab_size: {vocab_size} has only {vocab_size // 2 - 1} key tokens "
                             f"([1, vocab_size // 2)), fewer than num_kv_pairs={num_kv_pairs}; it needs "
                             f"vocab_size >= {2 * (num_kv_pairs + 1)}")
        if seq_len < 4 * num_kv_pairs:
            raise ValueError(f"data.seq_len: {seq_len} is too short for mqar with num_kv_pairs={num_kv_pairs}; "
                             f"it needs at least {4 * num_kv_pairs}")
        if power_a <= 0:
            raise ValueError(f"power_a: must be > 0, got {power_a}")
        self.vocab_size = int(vocab_size)
        self.num_kv_pairs = int(num_kv_pairs)
        self.power_a = float(power_a)
        self.num_keys = self.vocab_size // 2 - 1          # key tokens 1 .. V//2 - 1
        self.first_value = self.vocab_size // 2           # value tokens V//2 .. V-1
        self.num_values = self.vocab_size - self.first_value
        self.chance_accuracy = 1.0 / self.num_values
        self.num_gaps = (self.seq_len - 2 * self.num_kv_pairs) // 2
        # log of the unnormalised power-law weights of gap g = 0 .. num_gaps-1
        self._log_gap_weights = (self.power_a - 1.0) * np.log(np.arange(1, self.num_gaps + 1, dtype=np.float64))

    @classmethod
    def from_config(cls, config: Any, run_dir: Path | None = None) -> "MQARTask":
        o = config.mqar
        return cls(config.seq_len, config.seed, vocab_size=o.vocab_size, num_kv_pairs=o.num_kv_pairs)

    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        B, L, N, V = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
        rows = np.arange(B)[:, None]

        # distinct keys and distinct values per row: the first N entries of a random permutation
        keys = np.argsort(rng.random((B, self.num_keys)), axis=1)[:, :N] + 1
        values = np.argsort(rng.random((B, self.num_values)), axis=1)[:, :N] + self.first_value

        # N distinct gaps per row, weighted sampling without replacement via the Gumbel top-k trick
        # (same law as drawing one at a time proportionally to the remaining weights, in draw order)
        scores = self._log_gap_weights + rng.gumbel(size=(B, self.num_gaps))
        top = np.argpartition(-scores, N - 1, axis=1)[:, :N]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        gaps = np.take_along_axis(top, order, axis=1)
        query_pos = 2 * N + 2 * gaps

        # noise: uniform over [1, V) without this row's keys
        allowed = np.ones((B, V), dtype=bool)
        allowed[:, 0] = False
        allowed[rows, keys] = False
        allowed_tokens = np.nonzero(allowed)[1].reshape(B, V - 1 - N)
        inputs = np.take_along_axis(allowed_tokens, rng.integers(0, V - 1 - N, size=(B, L)), axis=1)

        inputs[:, 0:2 * N:2] = keys
        inputs[:, 1:2 * N:2] = values
        inputs[rows, query_pos] = keys
        targets = np.zeros((B, L), dtype=np.int32)
        targets[rows, query_pos] = values
        weights = np.zeros((B, L), dtype=np.float32)
        weights[rows, query_pos] = 1.0
        return lm_batch(inputs, targets, weights)
