"""ListOps: labels re-derived by an independent stack evaluator over the token strings."""

import statistics

import numpy as np
import pytest

from longseq.data import ListOpsTask
from longseq.data.listops import VOCAB, decode

OPS = {"[MAX": max, "[MIN": min, "[MED": lambda v: int(statistics.median(v)), "[SM": lambda v: sum(v) % 10}


def evaluate(words):
    """(value, operator depth, largest argument count, smallest argument count) of a token string."""
    stack, result, depth, most, least = [], None, 0, 0, 10 ** 9
    for word in words:
        if word in OPS:
            stack.append((word, []))
            depth = max(depth, len(stack))
            continue
        if word == "]":
            op, args = stack.pop()
            most, least = max(most, len(args)), min(least, len(args))
            value = OPS[op](args)
        else:
            value = int(word)
            assert 0 <= value <= 9
        assert result is None, "tokens after the end of the expression"
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    assert not stack and result is not None, "unbalanced expression"
    return result, depth, most, least


def test_evaluator_on_known_expressions():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]".split())[:2] == (9, 2)
    assert evaluate("[MED 2 5 ]".split())[0] == 3           # LRA: int(np.median([2, 5])) = int(3.5)
    assert evaluate("[MED 1 8 3 ]".split())[0] == 3
    assert evaluate("[SM 9 9 [MAX 1 2 ] ]".split())[0] == 0
    assert evaluate(["7"])[:2] == (7, 0)
    with pytest.raises(AssertionError):
        evaluate("[MAX 2 9".split())


def check_listops(batch, task):
    x, labels, mask = batch["inputs"], batch["labels"], batch["mask"]
    depths = []
    for row in range(x.shape[0]):
        n = int(mask[row].sum())
        assert (mask[row, :n] == 1).all() and (x[row, :n] != 0).all() and (x[row, n:] == 0).all()
        assert task.min_length <= n <= task.seq_len
        words = [VOCAB[t] for t in x[row, :n]]
        value, depth, most, least = evaluate(words)
        assert value == labels[row], decode(x[row])
        assert depth <= task.max_depth
        if depth:
            assert 2 <= least and most <= task.max_args
        depths.append(depth)
    return depths


@pytest.mark.parametrize("seq_len,kw", [(8, {}), (64, {}), (256, {}), (512, dict(max_depth=3, max_args=5, min_length=20)),
                                        (100, dict(max_depth=1, min_length=5)), (64, dict(max_args=2)),
                                        (30, dict(min_length=1))])
def test_labels_lengths_depths(seq_len, kw):
    task = ListOpsTask(seq_len, seed=4, **kw)
    depths = []
    for split in ("train", "eval"):
        depths += check_listops(task.batch(split, 0, 24), task)
    if task.max_depth > 1 and task.min_length > 4:
        assert max(depths) >= 2                                  # expressions really nest


def test_checker_catches_a_wrong_label():
    task = ListOpsTask(64, seed=0)
    b = task.batch("train", 0, 4)
    b["labels"] = (b["labels"] + 1) % 10
    with pytest.raises(AssertionError):
        check_listops(b, task)


def test_depth_limit_is_reached_but_not_exceeded():
    task = ListOpsTask(400, seed=0, max_depth=3)
    depths = check_listops(task.batch("train", 0, 32), task)
    assert max(depths) == 3


def test_min_length_default_and_labels_vary():
    task = ListOpsTask(256, seed=0)
    assert task.min_length == 64
    b = task.batch("train", 0, 64)
    assert len(np.unique(b["labels"])) >= 5
    assert task.vocab_size == 16 and task.num_classes == 10 and task.chance_accuracy == 0.1
    assert task.label_histogram([b]).sum() == pytest.approx(1.0)


def test_invalid_options():
    with pytest.raises(ValueError, match="data.listops.min_length"):
        ListOpsTask(64, 0, min_length=65)
    with pytest.raises(ValueError, match="unreachable"):
        ListOpsTask(64, 0, max_depth=1, max_args=2, min_length=5)   # longest: [OP d d ] = 4 tokens
