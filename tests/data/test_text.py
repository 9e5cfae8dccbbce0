"""Byte-level text: windows are contiguous bytes of their split; eval documents are held out."""

import sys

import numpy as np
import pytest

from longseq.data import TextTask
from longseq.data import text as text_module


@pytest.fixture(scope="module")
def task():
    return TextTask(256, seed=0)


@pytest.fixture(scope="module")
def topics():
    from pydoc_data.topics import topics
    return {name: body.encode("utf-8") for name, body in topics.items()}


def split_bytes(task, topics, split):
    return b"\x00".join(topics[name] for name in task.document_names[split]) + b"\x00"


def test_main_source_and_split(task, topics):
    assert task.source == "pydoc_data.topics"
    train, evals = task.document_names["train"], task.document_names["eval"]
    assert not set(train) & set(evals)
    assert set(train) | set(evals) <= set(topics)
    distinct = len(set(topics.values()))
    assert len(train) + len(evals) == distinct
    assert len(evals) == max(1, round(0.05 * distinct))
    assert task.vocab_size == 256 and task.chance_accuracy == pytest.approx(1 / 256)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_windows_are_contiguous_bytes_of_their_split(task, topics, split):
    source = split_bytes(task, topics, split)
    b = task.batch(split, 0, 16)
    assert (b["weights"] == 1).all()
    assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for row in range(16):
        window = bytes(b["inputs"][row].astype(np.uint8)) + bytes([b["targets"][row, -1]])
        assert window in source


def test_eval_windows_are_not_in_train(task, topics):
    train = split_bytes(task, topics, "train")
    b = task.batch("eval", 0, 8)
    for row in range(8):
        assert bytes(b["inputs"][row].astype(np.uint8)) not in train


def test_seq_len_too_long_for_eval_split():
    with pytest.raises(ValueError, match="data.seq_len"):
        TextTask(10 ** 6, seed=0)


def test_starts_cover_the_split():
    task = TextTask(2, seed=0)
    size = task.num_bytes["eval"]
    firsts = [task.batch("eval", i, 256)["inputs"][:, 0] for i in range(4)]
    assert len(np.unique(np.concatenate(firsts))) > 20
    assert size == task.data["eval"].size


def test_fallback_to_stdlib_sources(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)      # import now raises ImportError
    source, documents = text_module.load_documents()
    assert source.startswith("stdlib .py files")
    assert len(documents) > 10 and any(name == "os.py" for name, _ in documents)
    task = TextTask(128, seed=0, documents=documents, source=source)
    b = task.batch("eval", 0, 2)
    assert b["inputs"].shape == (2, 128)


def test_split_rule_and_window_bounds_on_tiny_documents():
    documents = [("c", b"cccc"), ("a", b"aaaa"), ("b", b"bbb"), ("dup", b"aaaa")]   # "dup" is dropped
    task = TextTask(3, seed=0, documents=documents, source="tiny")
    assert task.document_names == {"train": ["a", "c"], "eval": ["b"]}
    assert bytes(task.data["eval"]) == b"bbb\x00" and bytes(task.data["train"]) == b"aaaa\x00cccc\x00"
    b = task.batch("eval", 0, 3)                      # the eval split is exactly one window long
    assert (b["inputs"] == np.frombuffer(b"bbb", np.uint8)).all()
    assert (b["targets"] == np.frombuffer(b"bb\x00", np.uint8)).all()
    with pytest.raises(ValueError, match="data.seq_len.*eval split"):
        TextTask(4, seed=0, documents=documents)


# ----------------------------------------------------------------------------------------------
# BPE tokens (data.text.tokenizer=bpe)

@pytest.fixture(scope="module")
def bpe_task():
    return TextTask(256, seed=0, tokenizer="bpe", vocab_size=2048)


def test_bpe_tokens_round_trip_and_end_every_document(bpe_task):
    task = bpe_task
    assert 257 <= task.vocab_size <= 2048 and task.chance_accuracy == 1 / task.vocab_size
    end = task.tokenizer.token_to_id(text_module.END_OF_TEXT)
    for split, tokens in task.data.items():
        assert tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < task.vocab_size
        documents = np.split(tokens, np.flatnonzero(tokens == end) + 1)[:-1]  # each ends with `end`
        assert len(documents) == len(task.document_names[split])
        names = dict(text_module.pydoc_documents())
        for name, ids in list(zip(task.document_names[split], documents))[:5]:
            assert task.tokenizer.decode(list(ids[:-1])) == names[name].decode("utf-8")  # byte-level: lossless
    assert task.data["train"].size < task.num_bytes["train"] / 3  # BPE merges: several bytes per token
    batch = task.batch("train", 3, 4)
    assert batch["inputs"].shape == (4, 256) and (batch["inputs"][:, 1:] == batch["targets"][:, :-1]).all()


def test_bpe_training_is_deterministic(bpe_task):
    again = TextTask(256, seed=0, tokenizer="bpe", vocab_size=2048)
    assert all(np.array_equal(again.data[split], bpe_task.data[split]) for split in ("train", "eval"))


def test_a_run_keeps_its_tokenizer_and_resumes_with_it(tmp_path, monkeypatch):
    from longseq.config import load_config
    from longseq.data import make_task
    from longseq.train import train

    config = load_config(None, ["data.task=text", "data.text.tokenizer=bpe", "data.text.vocab_size=1024",
                                "data.seq_len=64", "data.batch_size=2", "model.d_model=32", "model.num_layers=1",
                                "train.steps=2", "train.progress=false", f"train.run_dir={tmp_path}", "train.name=bpe"])
    result = train(config)
    saved = tmp_path / "bpe" / "tokenizer.json"
    assert saved.exists() and result["chance_accuracy"] == pytest.approx(1 / make_task(config.data).vocab_size)
    monkeypatch.setattr(text_module, "train_bpe", lambda *a: pytest.fail("trained again instead of loading"))
    reloaded = make_task(config.data, run_dir=tmp_path / "bpe")
    from tokenizers import Tokenizer

    assert reloaded.tokenizer.to_str() == Tokenizer.from_file(str(saved)).to_str()
    assert train(config)["step"] == 2  # resuming the finished run reloads it too


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"data\.text\.tokenizer: expected 'bytes' or 'bpe', got 'words'"):
        TextTask(16, seed=0, tokenizer="words")
