"""The second domain (standard-library source, globs of files): by-file split, inputs, errors."""

import json
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


class _Recorder:
    """Stands in for ``Pipeline.tool``: records each command and writes what the stage makes."""

    def __init__(self):
        self.calls = []

    def __call__(self, study, name, *args, nproc=1, capture=False):
        flags, key = {}, None
        for arg in args:  # "--flag value" pairs and bare switches ("--update-weight": True)
            if arg.startswith("--"):
                key = arg
                flags[key] = True
            else:
                flags[key], key = arg, None
        self.calls.append((name, flags))
        if name == "preprocess_data":
            Path(flags["--out"] + ".idx").parent.mkdir(parents=True, exist_ok=True)
            Path(flags["--out"] + ".idx").write_text("")
        elif name in ("prune_oneshot", "train_mask"):
            out = Path(flags["--save"])
            out.mkdir(parents=True)
            iters = flags.get("--train-iters", "0")
            (out / "latest_checkpointed_iteration.txt").write_text(iters)
            if name == "train_mask":  # the trainer's final held-out evaluation
                ppl = {"python-stdlib": 50.0, "embedded": 90.0}[flags["--eval-data"]]
                ppl -= 5.0 * ("maskllm_domain_from_general" in str(out))
                (out / "metrics.jsonl").write_text(f'{{"step": {iters}, "eval_ppl": {ppl}}}\n')
        elif name == "eval_zeroshot":
            tasks = [Path(t).stem for t in flags["--tasks"].split(",")]
            assert all(Path(t).is_file() for t in flags["--tasks"].split(","))
            acc = 0.6 if "maskllm" in flags["--load"] else 0.4
            rows = [{"task": t, "metric": m, "value": acc, "stderr": 0.03} for t in tasks
                    for m in ("acc", "acc_norm")]
            Path(flags["--output"]).parent.mkdir(parents=True, exist_ok=True)
            Path(flags["--output"]).write_text(json.dumps({"results": rows}))
        elif name == "eval_ppl":
            load = flags["--load"]
            ppl = 100.0 if "sparsegpt" in load else 60.0 if "maskllm" in load else 20.0
            return f'{{"ppl": {ppl}}}\n'
        return ""


def test_transfer_study_stages_budget_and_resume(tmp_path, monkeypatch):
    from megatron.sparse.demo import Pipeline
    from megatron.sparse.transfer import TransferConfig, TransferStudy

    recorder = _Recorder()
    monkeypatch.setattr(Pipeline, "tool", lambda self, *a, **k: recorder(self, *a, **k))
    cfg = TransferConfig(work_dir=str(tmp_path / "t"), dense=str(tmp_path / "dense"),
                         general_prior=str(tmp_path / "sgpt"), train_iters=6, domain_iters=3,
                         task_examples=5)
    rows = TransferStudy(cfg).run()
    trains = {Path(f["--save"]).name: f for n, f in recorder.calls if n == "train_mask"}
    assert set(trains) == {"maskllm_general", "maskllm_domain_from_general",
                           "maskllm_domain_from_sparsegpt"}
    general, from_general, from_sgpt = (trains[k] for k in (
        "maskllm_general", "maskllm_domain_from_general", "maskllm_domain_from_sparsegpt"))
    assert general["--prior"] == str(tmp_path / "sgpt") and general["--train-iters"] == "6"
    assert general["--data"].endswith("wiki_train") and general["--eval-data"] == "embedded"
    assert from_general["--prior"] == str(tmp_path / "t" / "maskllm_general")
    assert from_sgpt["--prior"] == str(tmp_path / "t" / "sparsegpt_update_domain")
    for key in ("--train-iters", "--global-batch-size", "--seq-length", "--data", "--lr"):
        assert from_general[key] == from_sgpt[key]  # the same budget and recipe
    assert from_sgpt["--data"].endswith("domain_train") and from_sgpt["--train-iters"] == "3"
    prunes = [f for n, f in recorder.calls if n == "prune_oneshot"]
    assert len(prunes) == 1 and prunes[0]["--calib-data"].endswith("domain_train")
    assert prunes[0]["--update-weight"] is True
    assert rows["MaskLLM domain, general-mask prior"] == {
        "python-stdlib": 45.0, "embedded": 60.0, "python_stdlib_cloze": 0.6,
        "python_stdlib_choice": 0.6}
    cloze = (tmp_path / "t" / "tasks" / "python_stdlib_cloze.jsonl").read_text().splitlines()
    held = "\n".join(sources.file_documents(sources.STDLIB, "heldout"))
    assert len(cloze) == 5 and all(json.loads(r)["context"].split()[0] in held for r in cloze)
    assert rows["dense"]["python-stdlib"] == 20.0 and rows["dense"]["python_stdlib_choice"] == 0.4
    assert rows["MaskLLM general (Wikipedia)"]["embedded"] == 90.0
    assert "beats both rivals on the domain: yes" in (tmp_path / "t" / "results.md").read_text()
    assert not list((tmp_path / "dense").glob("*"))  # nothing written into the inputs

    recorder.calls.clear()
    TransferStudy(cfg).run()  # every stage done: nothing runs again
    assert recorder.calls == []


def test_transfer_flags_document_inherited_settings():
    import argparse

    from megatron.sparse.cli import add_dataclass_args, field_docs
    from megatron.sparse.demo import RunSettings
    from megatron.sparse.transfer import TransferConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TransferConfig)
    text = " ".join(parser.format_help().split())
    assert "Gumbel temperature at step 0." in text  # a RunSettings field
    assert "Mask-learning steps of each domain mask" in text
    # a field a subclass redefines takes the subclass's docstring
    assert field_docs(TransferConfig)["eval_interval"] != field_docs(RunSettings)["eval_interval"]
    assert TransferConfig().work_dir == "runs/transfer"
