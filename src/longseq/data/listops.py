"""ListOps as in Long Range Arena (Tay et al. 2020; originally Nangia & Bowman 2018).

Expressions nest the operators MAX, MIN, MED (median) and SM (sum modulo 10) over the digits 0-9,
e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9. The label is the expression's value, 10 classes.

Tokens (vocab_size 16), following LRA's preprocessing, which drops the generator's "(" ")":

    0 pad | 1..10 the digits 0..9 (digit d is token d + 1) | 11 "[MAX" | 12 "[MIN" | 13 "[MED" |
    14 "[SM" | 15 "]"

Sampling follows LRA's recursive generator (`lra_benchmarks/data/listops.py`): every node is an
operator with probability 0.25 (if the depth limit allows one) and otherwise a digit, uniform over
0-9; an operator is uniform over the four and takes a uniform number of arguments in [2, max_args],
each an independent node. Trees whose token count falls outside [min_length, seq_len] are
rejected and re-sampled (LRA: 500 < length < 2000); `min_length` 0 means seq_len // 4.

Differences from LRA, all documented choices:

- depth: `max_depth` here is the deepest *operator nesting* (`[MAX 1 2 ]` has depth 1), as the
  config's help says. LRA's generator flag max_depth=10 allows operators at depths 1..9 only, so
  LRA's setting corresponds to max_depth=9 here.
- the root: when min_length >= 2 a digit root (one token) would always be rejected, so the root is
  drawn as an operator directly -- the same distribution as LRA's rejection, without the waste;
  sampling of an attempt stops as soon as it is certain to exceed seq_len (also distribution-neutral).
- MED of an even count of values is LRA's `int(np.median(values))`: the mean of the two middle
  values rounded down, e.g. MED(2, 5) = 3.
- LRA deduplicates its fixed data set; this stream samples independently (duplicates possible, rare
  at useful lengths).

Batch: `inputs` int32 [B, seq_len] (the expression, then pad 0), `labels` int32 [B] (its value),
`mask` float32 [B, seq_len] (1 on the expression's tokens).

Chance accuracy: 1 / num_classes = 0.1. The label distribution is not uniform (MAX and MIN push it
to the extremes), so a majority-class guess does better than 0.1; measure it on the eval set with
`label_histogram` if it matters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longseq.data.task import Split, Task, classification_batch

PAD = 0
DIGIT0 = 1                      # digit d is token DIGIT0 + d
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
OP0 = 11                        # operator i is token OP0 + i
CLOSE = 15
VOCAB = ("<pad>", *map(str, range(10)), *OPERATORS, "]")
OPERATOR_P = 0.25               # LRA's VALUE_P: a node is an operator when random() <= 0.25
MAX_ATTEMPTS = 20_000           # rejected trees per example before giving up


def apply_operator(op: int, args: list[int]) -> int:
    """Value of operator `op` (index into OPERATORS) on digit arguments."""
    if op == 0:
        return max(args)
    if op == 1:
        return min(args)
    if op == 2:
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(args) % 10


def max_tree_length(max_depth: int, max_args: int) -> int:
    """The longest expression (in tokens) with at most `max_depth` nested operators."""
    length = 1
    for _ in range(max_depth):
        length = 2 + max_args * length
    return length


def decode(tokens: np.ndarray) -> str:
    """Human-readable form of one token row (padding dropped)."""
    return " ".join(VOCAB[t] for t in np.asarray(tokens).tolist() if t != PAD)


class _Uniforms:
    """Uniform floats in [0, 1) from a numpy Generator, drawn in blocks (fast scalar access)."""

    def __init__(self, rng: np.random.Generator, block: int = 4096) -> None:
        self.rng, self.block = rng, block
        self.buf: list[float] = []
        self.pos = 0

    def __call__(self) -> float:
        if self.pos == len(self.buf):
            self.buf = self.rng.random(self.block).tolist()
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]


def sample_tree(u: _Uniforms, max_depth: int, max_args: int, max_length: int,
                root_is_operator: bool) -> tuple[list[int], int] | None:
    """One attempt of LRA's generator, emitted as tokens in prefix order with its value.

    Returns None as soon as the expression is certain to be longer than `max_length`.
    """
    tokens: list[int] = []
    stack: list[list[Any]] = []          # open operators: [op, arguments still to come, values]
    first = True
    while True:
        if len(stack) < max_depth and ((first and root_is_operator) or u() <= OPERATOR_P):
            op = int(u() * 4)
            stack.append([op, 2 + int(u() * (max_args - 1)), []])
            tokens.append(OP0 + op)
            first = False
            if len(tokens) + len(stack) > max_length:   # each open operator still needs its "]"
                return None
            continue
        first = False
        value = int(u() * 10)
        tokens.append(DIGIT0 + value)
        while stack:                      # hand the value up, closing every operator it completes
            frame = stack[-1]
            frame[2].append(value)
            frame[1] -= 1
            if frame[1]:
                break
            stack.pop()
            tokens.append(CLOSE)
            value = apply_operator(frame[0], frame[2])
        if len(tokens) + len(stack) > max_length:
            return None
        if not stack:
            return tokens, value


class ListOpsTask(Task):
    name = "listops"
    kind = "classification"
    vocab_size = len(VOCAB)
    num_classes = 10
    chance_accuracy = 0.1

    def __init__(self, seq_len: int, seed: int, max_depth: int = 10, max_args: int = 10,
                 min_length: int = 0) -> None:
        super().__init__(seq_len, seed)
        if max_depth < 1:
            raise ValueError(f"data.listops.max_depth: must be >= 1, got {max_depth}")
        if max_args < 2:
            raise ValueError(f"data.listops.max_args: must be >= 2, got {max_args}")
        self.max_depth = int(max_depth)
        self.max_args = int(max_args)
        self.min_length = int(min_length) if min_length > 0 else self.seq_len // 4
        if self.min_length > self.seq_len:
            raise ValueError(f"data.listops.min_length: {self.min_length} is longer than data.seq_len="
                             f"{self.seq_len}; expressions must fit in seq_len")
        self.root_is_operator = self.min_length >= 2
        if self.root_is_operator and self.seq_len < 4:
            raise ValueError(f"data.seq_len: {self.seq_len} is too short for listops; the shortest expression "
                             f"with an operator has 4 tokens")
        longest = max_tree_length(self.max_depth, self.max_args)
        if longest < self.min_length:
            raise ValueError(f"data.listops.min_length: {self.min_length} tokens is unreachable with "
                             f"max_depth={self.max_depth} and max_args={self.max_args} (longest possible "
                             f"expression: {longest} tokens); lower min_length or data.seq_len")

    @classmethod
    def from_config(cls, config: Any, run_dir: Path | None = None) -> "ListOpsTask":
        o = config.listops
        return cls(config.seq_len, config.seed, max_depth=o.max_depth, max_args=o.max_args,
                   min_length=o.min_length)

    def sample(self, u: _Uniforms) -> tuple[list[int], int]:
        """One accepted expression (tokens, value)."""
        for _ in range(MAX_ATTEMPTS):
            out = sample_tree(u, self.max_depth, self.max_args, self.seq_len, self.root_is_operator)
            if out is not None and len(out[0]) >= self.min_length:
                return out
        raise RuntimeError(f"listops: no expression with length in [{self.min_length}, {self.seq_len}] in "
                           f"{MAX_ATTEMPTS} attempts (max_depth={self.max_depth}, max_args={self.max_args}); "
                           f"lower data.listops.min_length or data.seq_len, or raise max_depth/max_args")

    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        u = _Uniforms(rng)
        inputs = np.zeros((batch_size, self.seq_len), dtype=np.int32)
        mask = np.zeros((batch_size, self.seq_len), dtype=np.float32)
        labels = np.zeros(batch_size, dtype=np.int32)
        for b in range(batch_size):
            tokens, labels[b] = self.sample(u)
            inputs[b, :len(tokens)] = tokens
            mask[b, :len(tokens)] = 1.0
        return classification_batch(inputs, labels, mask)

    def label_histogram(self, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Share of each label over some batches (e.g. the eval set): its max is the majority-class rate."""
        counts = np.bincount(np.concatenate([b["labels"] for b in batches]), minlength=self.num_classes)
        return counts / counts.sum()
