"""Induction heads: the target is the token after the first trigger."""

import numpy as np
import pytest

from longseq.data import InductionHeadsTask


def check_induction(batch, vocab_size):
    trigger = vocab_size - 1
    x, t, w = batch["inputs"], batch["targets"], batch["weights"]
    L = x.shape[1]
    assert (w[:, :-1] == 0).all() and (w[:, -1] == 1).all()
    for row in range(x.shape[0]):
        where = np.flatnonzero(x[row] == trigger)
        assert len(where) == 2 and where[1] == L - 1
        assert 1 <= x[row, where[0] + 1] < trigger
        assert t[row, -1] == x[row, where[0] + 1]
        assert (x[row] >= 1).all()


@pytest.mark.parametrize("seq_len,vocab_size", [(3, 3), (4, 16), (5, 4), (64, 16), (257, 100)])
def test_target_follows_first_trigger(seq_len, vocab_size):
    task = InductionHeadsTask(seq_len, seed=1, vocab_size=vocab_size)
    for split in ("train", "eval"):
        check_induction(task.batch(split, 2, 64), vocab_size)


def test_checker_catches_a_wrong_target():
    b = InductionHeadsTask(32, seed=0).batch("train", 0, 4)
    b["targets"] = b["targets"].copy()
    b["targets"][1, -1] = b["targets"][1, -1] % 14 + 1
    with pytest.raises(AssertionError):
        check_induction(b, 16)


def test_first_trigger_position_spreads_over_the_sequence():
    task = InductionHeadsTask(100, seed=0)
    x = task.batch("train", 0, 512)["inputs"]
    first = np.argmax(x == task.trigger, axis=1)
    assert first.min() < 10 and first.max() > 88


def test_chance_accuracy():
    assert InductionHeadsTask(16, 0, vocab_size=16).chance_accuracy == pytest.approx(1 / 14)
