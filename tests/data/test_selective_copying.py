"""Selective copying: the weighted targets are the prefix's data tokens, in order."""

import numpy as np
import pytest

from longseq.data import SelectiveCopyingTask


def check_copying(batch, num_tokens):
    x, t, w = batch["inputs"], batch["targets"], batch["weights"]
    L, N = x.shape[1], num_tokens
    for row in range(x.shape[0]):
        prefix = x[row, :L - N]
        data = prefix[prefix >= 3]                        # drop noise (1); markers (2) must not be there
        assert len(data) == N and not (prefix == 2).any() and not (prefix == 0).any()
        assert (x[row, L - N:] == 2).all()
        assert np.array_equal(np.flatnonzero(w[row]), np.arange(L - N, L))
        assert np.array_equal(t[row, w[row] == 1], data)


@pytest.mark.parametrize("seq_len,vocab_size,num_tokens", [(33, 16, 16), (32, 16, 16), (100, 4, 5),
                                                           (1000, 16, 16), (9, 30, 4)])
def test_targets_are_the_data_tokens_in_order(seq_len, vocab_size, num_tokens):
    task = SelectiveCopyingTask(seq_len, seed=2, vocab_size=vocab_size, num_tokens=num_tokens)
    for split in ("train", "eval"):
        check_copying(task.batch(split, 0, 32), num_tokens)


def test_checker_catches_swapped_targets():
    b = SelectiveCopyingTask(64, seed=0).batch("train", 0, 4)
    t = b["targets"].copy()
    row = next(r for r in range(4) if t[r, -1] != t[r, -2])
    t[row, -1], t[row, -2] = t[row, -2], t[row, -1]
    b["targets"] = t
    with pytest.raises(AssertionError):
        check_copying(b, 16)


def test_data_positions_are_spread():
    task = SelectiveCopyingTask(200, seed=0, num_tokens=8)
    x = task.batch("train", 0, 256)["inputs"][:, :192]
    positions = np.nonzero(x >= 3)[1]
    assert positions.min() < 5 and positions.max() > 186


def test_chance_and_errors():
    assert SelectiveCopyingTask(40, 0, vocab_size=16).chance_accuracy == pytest.approx(1 / 13)
    with pytest.raises(ValueError, match="data.seq_len"):
        SelectiveCopyingTask(31, 0, num_tokens=16)
