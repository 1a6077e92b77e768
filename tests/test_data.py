"""Corpus split, tokenised .bin/.idx files read back through megatron-core, token windows."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.sparse.data.corpus import embedded_articles, read_documents
from megatron.sparse.data.indexed import read_token_windows, write_indexed
from megatron.sparse.train.data import TrainBatches


class ToyTokenizer:
    """Bytes as ids (independent of the product's tokenizer code)."""

    eos_token_id = 0

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    def __len__(self):
        return 257


DOCS = ["first document", "second, a little longer document", "third"]


def test_indexed_round_trip_gives_exact_ids(tmp_path):
    tok = ToyTokenizer()
    stats = write_indexed(str(tmp_path / "d"), DOCS, encode=tok.encode, eod=0, vocab_size=257)
    assert stats == {"documents": 3, "tokens": sum(len(d.encode()) + 1 for d in DOCS)}
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 3
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == tok.encode(doc) + [0]
    stream = [t for d in DOCS for t in tok.encode(d) + [0]]
    windows = read_token_windows(str(tmp_path / "d"), 8)
    assert windows.tolist() == [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
    assert read_token_windows(str(tmp_path / "d"), 8, num_windows=2, offset=1).tolist() == \
        [stream[8:16], stream[16:24]]
    with pytest.raises(ValueError, match="fewer than"):
        read_token_windows(str(tmp_path / "d"), 8, num_windows=100)


def test_gpt_dataset_samples_are_the_tokenizer_ids(tmp_path):
    tok = ToyTokenizer()
    write_indexed(str(tmp_path / "d"), DOCS * 4, encode=tok.encode, eod=0, vocab_size=257)
    encoded = [tok.encode(d) for d in DOCS]
    batches = TrainBatches(prefix=str(tmp_path / "d"), seq_length=10, micro_batch_size=2,
                           global_batch_size=4, train_iters=2, seed=0, vocab_size=257)
    seen = 0
    for step in range(2):
        for tokens, labels in batches.micro_batches(step):
            for row_t, row_l in zip(tokens.tolist(), labels.tolist()):
                assert row_t[1:] == row_l[:-1]  # labels are the next tokens
                seen += 1
                pieces = _split_at(row_t + row_l[-1:], 0)
                # GPTDataset shuffles documents: a sample is whole documents (each + EOD) in some
                # order, cut at both ends
                if len(pieces) == 1:  # inside one document
                    assert any(_contains(e, pieces[0]) for e in encoded)
                    continue
                assert any(e[len(e) - len(pieces[0]):] == pieces[0] for e in encoded)
                assert all(p in encoded for p in pieces[1:-1])
                assert any(e[:len(pieces[-1])] == pieces[-1] for e in encoded)
    assert seen == 8


def _contains(seq, part):
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def _split_at(ids, sep):
    pieces, current = [], []
    for t in ids:
        if t == sep:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces + [current]


def test_embedded_split_is_deterministic_and_disjoint():
    train, held_out = embedded_articles("train"), embedded_articles("eval")
    assert len(held_out) >= 5 and len(train) >= 50
    assert not set(train) & set(held_out)
    assert embedded_articles("eval") == held_out
    assert all("<ref" not in a and "[[" not in a for a in held_out)
    with pytest.raises(ValueError, match="unknown split"):
        embedded_articles("test")


def test_jsonl_reader(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert list(read_documents(str(path))) == ["a", "b"]
    path.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="no key 'text'"):
        list(read_documents(str(path)))


def test_preprocess_tool_matches_tokenizer_ids(tmp_path):
    """The CLI on a text file with the embedded tokenizer: ids equal the tokenizer's."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron.sparse.data.tokenizer import encode, load_tokenizer

    text = tmp_path / "in.txt"
    text.write_text("Hello world.\n\n\nA second document, with more words.")
    tool = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
    result = subprocess.run([sys.executable, str(tool), "--input", str(text), "--tokenizer",
                             "embedded", "--out", str(tmp_path / "p")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer("embedded")
    ds = IndexedDataset(str(tmp_path / "p"))
    docs = ["Hello world.", "A second document, with more words."]
    for i, doc in enumerate(docs):
        assert ds[i].astype(np.int64).tolist() == encode(tok, doc) + [tok.eos_token_id]
