"""MQAR: targets checked by locating each query's key in the key-value prefix."""

import numpy as np
import pytest

from longseq.data import MQARTask


def check_mqar(batch, vocab_size, num_kv_pairs):
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    N, half = num_kv_pairs, vocab_size // 2
    for row in range(inputs.shape[0]):
        x, t, w = inputs[row], targets[row], weights[row]
        assert (x > 0).all()                                   # no padding
        keys, values = x[0:2 * N:2], x[1:2 * N:2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab_size)).all()
        assert len(set(keys.tolist())) == N and len(set(values.tolist())) == N
        query_positions = np.flatnonzero(w)
        assert len(query_positions) == N and (query_positions >= 2 * N).all()
        assert sorted(x[query_positions].tolist()) == sorted(keys.tolist())   # every key queried once
        for p in query_positions:
            earlier = np.flatnonzero(x[:p] == x[p])
            assert len(earlier) == 1, "the key must occur exactly once before its query"
            j = earlier[0]
            assert j < 2 * N and j % 2 == 0
            assert t[p] == x[j + 1]
        # no key of this sequence appears outside its two places
        for k in keys:
            assert (x == k).sum() == 2
        assert (t[w == 0] == 0).all()


@pytest.mark.parametrize("seq_len,vocab_size,num_kv_pairs", [(32, 64, 8), (33, 64, 8), (256, 64, 8),
                                                             (16, 8, 3), (1000, 200, 40), (4, 8, 1)])
def test_targets_are_the_bound_values(seq_len, vocab_size, num_kv_pairs):
    task = MQARTask(seq_len, seed=3, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
    for split in ("train", "eval"):
        check_mqar(task.batch(split, 1, 16), vocab_size, num_kv_pairs)


def test_checker_catches_a_wrong_target():
    task = MQARTask(64, seed=0)
    b = task.batch("train", 0, 2)
    b["targets"] = b["targets"].copy()
    p = np.flatnonzero(b["weights"][0])[0]
    b["targets"][0, p] = b["targets"][0, p] % 63 + 1 if b["targets"][0, p] != 63 else 32
    with pytest.raises(AssertionError):
        check_mqar(b, 64, 8)


def query_offsets(task, n_batches=8):
    offsets = []
    for i in range(n_batches):
        b = task.batch("train", i, 32)
        offsets.append(np.nonzero(b["weights"])[1] - 2 * task.num_kv_pairs)
    return np.concatenate(offsets) / (task.seq_len - 2 * task.num_kv_pairs)


def test_query_gaps_follow_zoology_power_law():
    near = query_offsets(MQARTask(1024, seed=0, num_kv_pairs=8))
    assert np.mean(near < 0.5) > 0.8            # power_a = 0.01: most queries close to the pairs
    assert near.max() > 0.5                     # ... with a tail reaching far
    uniform = query_offsets(MQARTask(1024, seed=0, num_kv_pairs=8, power_a=1.0))
    assert 0.4 < np.mean(uniform < 0.5) < 0.6


def test_chance_accuracy_is_one_over_value_tokens():
    assert MQARTask(64, 0, vocab_size=64).chance_accuracy == pytest.approx(1 / 32)
    assert MQARTask(64, 0, vocab_size=9, num_kv_pairs=3).chance_accuracy == pytest.approx(1 / 5)


def test_invalid_options():
    with pytest.raises(ValueError, match="data.mqar.vocab_size"):
        MQARTask(256, 0, vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="data.seq_len"):
        MQARTask(31, 0, vocab_size=64, num_kv_pairs=8)
