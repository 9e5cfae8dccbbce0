"""Language modelling on text that every Python installation ships, as bytes or BPE tokens.

Source: the standard library's help topics, `pydoc_data.topics.topics` (a dict of ~80 English
documentation texts, ~470 KB on Python 3.11). Its content depends on the Python version: runs on
different Python versions see different (similar) text; `TextTask.source` and
`TextTask.num_bytes` say what was loaded. If `pydoc_data` is missing (a stripped Python), the
documents are the top-level `.py` files of the standard library (`sysconfig.get_paths()["stdlib"]`)
instead, and `source` says so.

Documents: each is UTF-8 encoded; exact duplicates are dropped (the first by sorted name is kept).
They are split deterministically by sorted name: n_eval = round(eval_fraction * n), at least 1 and at
most n - 1, evenly spaced over the sorted list (the document at index floor((i + 0.5) * n / n_eval)
for i < n_eval) go to eval, the rest to train. Each split is the concatenation of its documents,
each followed by the end-of-document byte 0x00 (which never occurs in the text).

Tokens (`data.text.tokenizer`):
- bytes: one token per byte; vocab_size = 256, the end-of-document token is byte 0x00.
- bpe: a byte-level BPE (the `tokenizers` library: byte-level pre-tokenisation, so any text encodes)
  trained on the train split's documents to `data.text.vocab_size` tokens (fewer if the corpus runs out
  of merges), with one special token, `<|endoftext|>`, after every document. Training takes a second on
  this corpus and is deterministic; the run directory keeps it (tokenizer.json), and a resumed run
  loads it rather than training again, so the vocabulary a checkpoint was trained with never changes.

Batch: B windows of seq_len + 1 tokens at uniform random offsets of the split's tokens (windows may
span a document boundary); inputs = window[:-1], targets = window[1:], weights all 1.
Chance accuracy: 1 / vocab_size.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from longseq.data.task import Split, Task, lm_batch

END_OF_DOCUMENT = b"\x00"
END_OF_TEXT = "<|endoftext|>"  # the BPE tokenizer's end-of-document token
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (deterministic), with END_OF_TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def pydoc_documents() -> list[tuple[str, bytes]]:
    """The help topics, as (name, utf-8 text) sorted by name. Raises ImportError if absent."""
    from pydoc_data.topics import topics

    return sorted((name, text.encode("utf-8")) for name, text in topics.items())


def stdlib_documents() -> list[tuple[str, bytes]]:
    """Fallback: the top-level `.py` files of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((path.name, path.read_bytes().replace(b"\x00", b"")) for path in root.glob("*.py"))


def load_documents() -> tuple[str, list[tuple[str, bytes]]]:
    """(source description, documents): the help topics, or the stdlib sources if they are missing."""
    try:
        return "pydoc_data.topics", pydoc_documents()
    except ImportError:
        return f"stdlib .py files in {sysconfig.get_paths()['stdlib']}", stdlib_documents()


def split_documents(documents: list[tuple[str, bytes]], eval_fraction: float
                    ) -> dict[str, list[tuple[str, bytes]]]:
    """Deduplicate and split documents (sorted by name) into {"train": [...], "eval": [...]}."""
    seen: set[bytes] = set()
    unique = []
    for name, text in sorted(documents):
        if text and text not in seen:
            seen.add(text)
            unique.append((name, text))
    n = len(unique)
    if n < 2:
        raise ValueError(f"text: need at least 2 distinct documents to split, found {n}")
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    eval_index = {int((i + 0.5) * n / n_eval) for i in range(n_eval)}
    return {"train": [d for i, d in enumerate(unique) if i not in eval_index],
            "eval": [d for i, d in enumerate(unique) if i in eval_index]}


class TextTask(Task):
    name = "text"
    kind = "lm"

    def __init__(self, seq_len: int, seed: int, eval_fraction: float = 0.05,
                 documents: list[tuple[str, bytes]] | None = None, source: str | None = None,
                 tokenizer: str = "bytes", vocab_size: int = 4096, tokenizer_file: Path | None = None) -> None:
        """tokenizer: "bytes" or "bpe" (module docstring); vocab_size: the BPE vocabulary to train;
        tokenizer_file: a saved BPE tokenizer to load instead of training one (where it exists)."""
        super().__init__(seq_len, seed)
        if not 0 < eval_fraction < 1:
            raise ValueError(f"data.text.eval_fraction: must be in (0, 1), got {eval_fraction}")
        if tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"data.text.tokenizer: expected 'bytes' or 'bpe', got {tokenizer!r}")
        self.eval_fraction = float(eval_fraction)
        if documents is None:
            source, documents = load_documents()
        self.source = source or "given documents"
        splits = split_documents(documents, self.eval_fraction)
        self.document_names = {split: [name for name, _ in docs] for split, docs in splits.items()}
        self.num_bytes = {split: sum(len(text) + 1 for _, text in docs) for split, docs in splits.items()}
        self.tokenizer = None
        if tokenizer == "bytes":
            self.vocab_size = 256
            # the tokens of each split, cached here (not in a module global)
            self.data = {split: np.frombuffer(b"".join(text + END_OF_DOCUMENT for _, text in docs), dtype=np.uint8)
                         for split, docs in splits.items()}
        else:
            from tokenizers import Tokenizer

            texts = {split: [text.decode("utf-8") for _, text in docs] for split, docs in splits.items()}
            if tokenizer_file is not None and Path(tokenizer_file).exists():
                self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            else:
                self.tokenizer = train_bpe(texts["train"], vocab_size)
            self.vocab_size = self.tokenizer.get_vocab_size()
            end = self.tokenizer.token_to_id(END_OF_TEXT)
            self.data = {split: np.array([i for encoding in self.tokenizer.encode_batch(docs)
                                          for i in (*encoding.ids, end)], dtype=np.int32)
                         for split, docs in texts.items()}
        self.chance_accuracy = 1.0 / self.vocab_size
        for split, tokens in self.data.items():
            if tokens.size < self.seq_len + 1:
                raise ValueError(f"data.seq_len: {self.seq_len} is too long for the text task: its {split} split "
                                 f"has only {tokens.size} tokens and a window needs seq_len + 1; lower data.seq_len"
                                 + (" or raise data.text.eval_fraction" if split == "eval" else ""))

    @classmethod
    def from_config(cls, config: Any, run_dir: Path | None = None) -> "TextTask":
        return cls(config.seq_len, config.seed, eval_fraction=config.text.eval_fraction,
                   tokenizer=config.text.tokenizer, vocab_size=config.text.vocab_size,
                   tokenizer_file=None if run_dir is None else Path(run_dir) / TOKENIZER_FILE)

    def save_files(self, run_dir: Path) -> None:
        """The BPE tokenizer, as tokenizer.json (bytes need nothing)."""
        if self.tokenizer is not None and not (Path(run_dir) / TOKENIZER_FILE).exists():
            self.tokenizer.save(str(Path(run_dir) / TOKENIZER_FILE))

    def _generate(self, rng: np.random.Generator, split: Split, batch_size: int) -> dict[str, np.ndarray]:
        data, L = self.data[split], self.seq_len
        starts = rng.integers(0, data.size - L, size=batch_size)        # last window ends at data.size
        windows = data[starts[:, None] + np.arange(L + 1)]
        return lm_batch(windows[:, :-1], windows[:, 1:], np.ones((batch_size, L), dtype=np.float32))
