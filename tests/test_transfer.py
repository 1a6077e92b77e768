"""The second domain (standard-library source, globs of files): by-file split, inputs, errors."""

from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.sparse.data import sources
from megatron.sparse.eval.datasets import eval_text
from tests.tools import run_tool_in_process


def _tree(root: Path) -> dict[str, str]:
    """A small source tree: 40 nested .py files and a file the glob must not match."""
    files = {f"pkg{i % 3}/sub{i % 2}/m{i:02d}.py": f"def f{i}():\n    return {i}\n"
             for i in range(40)}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "notes.txt").write_text("not python")
    return files


def test_stdlib_split_is_deterministic_disjoint_and_by_file():
    files = sources.stdlib_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 300
    parts = [set(Path(r).parts[:-1]) for r in rels]
    assert not any(p & {"test", "tests", "idle_test", "site-packages", "encodings"} for p in parts)
    assert not any(Path(r).name.startswith("test_") for r in rels)
    train = [r for r in rels if sources.split_of(r) == "train"]
    held = [r for r in rels if sources.split_of(r) == "heldout"]
    assert sorted(train + held) == rels and not set(train) & set(held)
    # about 1 in 10 files held out; binomial sd ~ sqrt(0.09 n) ~ 7 files for n ~ 600: 4 sd band
    assert abs(len(held) - len(rels) / 10) < 4 * (0.09 * len(rels)) ** 0.5
    texts = sources.file_documents(sources.STDLIB, "heldout")
    assert texts == [p.read_text(encoding="utf-8", errors="replace") for r, p in files
                     if r in set(held)]
    assert sources.file_documents(sources.STDLIB, "heldout") == texts  # same on a second call
    assert eval_text("python-stdlib") == "\n\n".join(texts)


def test_glob_is_recursive_sorted_and_split_by_relative_path(tmp_path):
    files = _tree(tmp_path / "a" / "src")
    _tree(tmp_path / "b")  # the same tree elsewhere: the split must not depend on the location
    matched = sources.glob_files(str(tmp_path / "a" / "src" / "**" / "*.py"))
    assert [rel for rel, _ in matched] == sorted(files)
    docs = {split: sources.file_documents(str(tmp_path / "a" / "src" / "**" / "*.py"), split)
            for split in ("train", "heldout", "all")}
    other = {split: sources.file_documents(str(tmp_path / "b" / "**" / "*.py"), split)
             for split in ("train", "heldout")}
    assert docs["train"] == other["train"] and docs["heldout"] == other["heldout"]
    assert sorted(docs["train"] + docs["heldout"]) == sorted(docs["all"])
    assert docs["all"] == [files[r] for r in sorted(files)]
    assert not set(docs["train"]) & set(docs["heldout"])  # every file text here is unique
    with pytest.raises(ValueError, match="unknown split"):
        sources.file_documents(str(tmp_path / "b" / "**" / "*.py"), "test")


def _preprocess(*args: str):
    return run_tool_in_process("preprocess_data", *args)


def test_preprocess_glob_writes_one_document_per_file(tmp_path):
    from megatron.sparse.data.tokenizer import encode, load_tokenizer

    files = _tree(tmp_path / "src")
    pattern = str(tmp_path / "src" / "**" / "*.py")
    result = _preprocess("--input", pattern, "--split", "heldout", "--tokenizer", "embedded",
                         "--out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    held = [files[r] for r in sorted(files) if sources.split_of(r) == "heldout"]
    tok = load_tokenizer("embedded")
    ds = IndexedDataset(str(tmp_path / "p"))
    assert len(ds) == len(held) > 0
    for i, text in enumerate(held):
        assert ds[i].astype(np.int64).tolist() == encode(tok, text) + [tok.eos_token_id]


def test_bad_inputs_give_one_line_errors(tmp_path):
    result = _preprocess("--input", str(tmp_path / "nowhere" / "**" / "*.py"), "--tokenizer",
                         "embedded", "--out", str(tmp_path / "p"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "matches no files" in result.stderr and "quote the pattern" in result.stderr
    (tmp_path / "x.txt").write_text("text")
    result = _preprocess("--input", str(tmp_path / "x.txt"), "--split", "train", "--tokenizer",
                         "embedded", "--out", str(tmp_path / "p"))
    assert result.returncode == 2 and "--split applies to" in result.stderr
    assert not Path(f"{tmp_path / 'p'}.bin").exists()
