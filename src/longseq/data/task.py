"""The shared interface of every data task, and the batch iterators built on it.

A task is a deterministic function from `(split, index, batch_size)` to a batch of numpy arrays.
Every batch draws from its own generator, `np.random.default_rng([seed, split_code, index])`, so

- the same (seed, split, index, batch_size) always gives the same batch, on any machine;
- a training run resumed at step `s` asks for batch `s` and sees exactly what it would have seen;
- the train and eval streams (split codes 0 and 1) are independent streams.

Batch layout (every array has leading size `batch_size` and sequence length `seq_len`):

- kind "lm": `inputs` int32 [B, L]; `targets` int32 [B, L], the token to predict at each position;
  `weights` float32 [B, L], 1 where the loss/accuracy counts, else 0 (targets there carry no meaning).
- kind "classification": `inputs` int32 [B, L]; `labels` int32 [B]; `mask` float32 [B, L],
  1 on real tokens and 0 on padding.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np

Split = Literal["train", "eval"]
Kind = Literal["lm", "classification"]

SPLIT_CODES: dict[str, int] = {"train": 0, "eval": 1}


class Task(abc.ABC):
    """Base of every task. Subclasses set the class attributes and implement `_generate`.

    Attributes:
        name: the task's name as used in `data.task`.
        kind: "lm" (per-position targets and weights) or "classification" (one label per sequence).
        vocab_size: input tokens lie in [0, vocab_size); 0 is padding for the synthetic tasks.
        num_classes: number of labels (classification only; 0 for lm).
        chance_accuracy: accuracy of guessing: for lm tasks, uniform guessing among the possible
            answers at the weighted positions; for classification, 1 / num_classes.
        seq_len: length of every sequence.
        seed: the data seed (`data.seed`).
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    vocab_size: int
    num_classes: int = 0
    chance_accuracy: float

    def __init__(self, seq_len: int, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"data.seq_len: must be >= 1, got {seq_len}")
        if seed < 0:
            raise ValueError(f"data.seed: must be >= 0, got {seed}")
        self.seq_len = int(seq_len)
        self.seed = int(seed)

    # Subclasses also define `from_config(cls, data_config, run_dir=None)`: run_dir is the run directory
    # whose files (`save_files`) a task reloads when a run resumes.

    def save_files(self, run_dir: Path) -> None:
        """Write what a resumed run must reload to stay the same task (nothing, for most tasks)."""

    def rng(self, split: Split, index: int) -> np.random.Generator:
        """The generator of batch `index` of `split`: depends on (seed, split, index) only."""
        if split not in SPLIT_CODES:
            raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
        if index < 0:
            raise ValueError(f"index: must be >= 0, got {index}")
        return np.random.default_rng([self.seed, SPLIT_CODES[split], int(index)])

    def batch(self, split: Split, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number `index` of `split`; a pure function of (seed, split, index, batch_size)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        return self._generate(self.rng(split, index), split, int(batch_size))

    @abc.abstractmethod
    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        """Draw one batch from `rng` (the only source of randomness allowed)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, seq_len={self.seq_len}, "
                f"vocab_size={self.vocab_size}, num_classes={self.num_classes}, seed={self.seed})")


def lm_batch(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Assemble an lm batch with the canonical dtypes."""
    return {"inputs": np.ascontiguousarray(inputs, dtype=np.int32),
            "targets": np.ascontiguousarray(targets, dtype=np.int32),
            "weights": np.ascontiguousarray(weights, dtype=np.float32)}


def classification_batch(inputs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Assemble a classification batch with the canonical dtypes."""
    return {"inputs": np.ascontiguousarray(inputs, dtype=np.int32),
            "labels": np.ascontiguousarray(labels, dtype=np.int32),
            "mask": np.ascontiguousarray(mask, dtype=np.float32)}


def batches(task: Task, split: Split, batch_size: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield `task.batch(split, i, batch_size)` for i = start, start + 1, ... (endless)."""
    index = int(start)
    while True:
        yield task.batch(split, index, batch_size)
        index += 1


def eval_set(task: Task, config: Any) -> list[dict[str, np.ndarray]]:
    """The fixed evaluation set: `task.batch("eval", i, config.batch_size)` for i < config.eval_batches.

    `config` is a `longseq.config.DataConfig`.
    """
    return [task.batch("eval", i, config.batch_size) for i in range(config.eval_batches)]
