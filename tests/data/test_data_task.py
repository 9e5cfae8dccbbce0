"""The shared Task interface: determinism, resumability, eval set, shapes, dtypes, make_task."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from longseq.config import DataConfig, ListOpsConfig, MQARConfig
from longseq.data import TASKS, Task, batches, eval_set, make_task

NAMES = ["mqar", "induction_heads", "selective_copying", "listops", "text"]
SEQ_LENS = {"mqar": [32, 64, 257], "induction_heads": [4, 33, 256], "selective_copying": [33, 64, 300],
            "listops": [8, 64, 256], "text": [2, 100, 512]}


def config(name, seq_len=64, seed=0, **kw):
    return DataConfig(task=name, seq_len=seq_len, seed=seed, batch_size=4, eval_batches=3, **kw)


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_registry_names_match_config():
    assert sorted(TASKS) == sorted(NAMES)
    for name in NAMES:
        task = make_task(config(name))
        assert isinstance(task, Task) and task.name == name


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_same_batch(name):
    a = make_task(config(name)).batch("train", 3, 4)
    b = make_task(config(name)).batch("train", 3, 4)   # a fresh task object: no hidden state shared
    assert same(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_stateless(name):
    task = make_task(config(name))
    first = task.batch("train", 7, 4)
    for i in range(7):
        task.batch("train", i, 4)
        task.batch("eval", i, 4)
    assert same(first, task.batch("train", 7, 4))


@pytest.mark.parametrize("name", NAMES)
def test_index_split_and_seed_change_the_batch(name):
    task = make_task(config(name))
    base = task.batch("train", 3, 4)
    assert not same(base, task.batch("train", 4, 4))
    assert not same(base, task.batch("eval", 3, 4))
    assert not same(base, make_task(config(name, seed=1)).batch("train", 3, 4))


@pytest.mark.parametrize("name", NAMES)
def test_resume_sees_the_same_batches(name):
    task = make_task(config(name))
    from_start = list(itertools.islice(batches(task, "train", 4, start=0), 7))
    resumed = list(itertools.islice(batches(task, "train", 4, start=5), 2))
    assert same(resumed[0], from_start[5]) and same(resumed[1], from_start[6])
    assert not same(from_start[0], from_start[1])


@pytest.mark.parametrize("name", NAMES)
def test_eval_set_is_the_fixed_eval_batches(name):
    cfg = config(name)
    task = make_task(cfg)
    evals = eval_set(task, cfg)
    assert len(evals) == cfg.eval_batches
    for i, b in enumerate(evals):
        assert same(b, task.batch("eval", i, cfg.batch_size))
    assert same(evals[0], eval_set(make_task(cfg), cfg)[0])
    assert not same(evals[0], task.batch("train", 0, cfg.batch_size))


@pytest.mark.parametrize("name,seq_len", [(n, L) for n in NAMES for L in SEQ_LENS[n]])
def test_shapes_dtypes_ranges(name, seq_len):
    task = make_task(config(name, seq_len=seq_len))
    assert task.seq_len == seq_len
    B = 5
    b = task.batch("train", 0, B)
    assert b["inputs"].shape == (B, seq_len) and b["inputs"].dtype == np.int32
    assert b["inputs"].min() >= 0 and b["inputs"].max() < task.vocab_size
    if task.kind == "lm":
        assert set(b) == {"inputs", "targets", "weights"}
        assert task.num_classes == 0
        assert b["targets"].shape == (B, seq_len) and b["targets"].dtype == np.int32
        assert b["weights"].shape == (B, seq_len) and b["weights"].dtype == np.float32
        assert b["targets"].min() >= 0 and b["targets"].max() < task.vocab_size
        assert set(np.unique(b["weights"])) <= {0.0, 1.0}
        assert (b["weights"].sum(axis=1) > 0).all()
    else:
        assert task.kind == "classification"
        assert set(b) == {"inputs", "labels", "mask"}
        assert b["labels"].shape == (B,) and b["labels"].dtype == np.int32
        assert b["mask"].shape == (B, seq_len) and b["mask"].dtype == np.float32
        assert b["labels"].min() >= 0 and b["labels"].max() < task.num_classes
        assert set(np.unique(b["mask"])) <= {0.0, 1.0}


EXPECTED_CHANCE = {"mqar": 1 / 32, "induction_heads": 1 / 14, "selective_copying": 1 / 13, "listops": 1 / 10,
                   "text": 1 / 256}


@pytest.mark.parametrize("name", NAMES)
def test_chance_accuracy(name):
    task = make_task(config(name))
    assert task.chance_accuracy == pytest.approx(EXPECTED_CHANCE[name])
    assert 0 < task.chance_accuracy < 1


def test_make_task_passes_the_task_options():
    task = make_task(config("mqar", mqar=MQARConfig(vocab_size=128, num_kv_pairs=4)))
    assert (task.vocab_size, task.num_kv_pairs) == (128, 4)
    assert task.batch("train", 0, 2)["weights"].sum() == 8
    task = make_task(config("listops", seq_len=100, listops=ListOpsConfig(max_depth=3, max_args=4, min_length=30)))
    assert (task.max_depth, task.max_args, task.min_length) == (3, 4, 30)


def test_make_task_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'bogus'"):
        make_task(SimpleNamespace(task="bogus", seq_len=64, seed=0))


def test_bad_split_index_batch_size():
    task = make_task(config("induction_heads"))
    with pytest.raises(ValueError, match="split"):
        task.batch("test", 0, 4)
    with pytest.raises(ValueError, match="index"):
        task.batch("train", -1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        task.batch("train", 0, 0)
