"""``--save`` safety: a run resumes only from a training run of its own method and model, with
the same data settings; anything else is a one-line error that leaves the directory untouched."""

import json
import os
import re
from pathlib import Path

import pytest

from megatron.sparse import checkpoint, parallel
from megatron.sparse.train.config import TrainConfig
from tests.tools import run_tool_in_process
from tests.train_fixtures import tiny_checkpoint, write_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = tiny_checkpoint(str(root / "base"))
    write_tokens(str(root / "tokens"), docs=40, doc_len=50, vocab=256)
    write_tokens(str(root / "other_tokens"), docs=40, doc_len=50, vocab=256, seed=1)
    return root, base, str(root / "tokens")


def _cfg(base, data, save, **kw) -> TrainConfig:
    fields = dict(load=base, data=data, save=save, seq_length=16, micro_batch_size=2,
                  global_batch_size=4, train_iters=1, tau_start=2.0, tau_end=0.5,
                  kappa_start=5.0, kappa_end=10.0, lr=1e-2, logits_lr_mult=1.0, reg_lambda=0.0,
                  seed=7)
    fields.update(kw)
    return TrainConfig(**fields)


def _trainer(cfg):
    from megatron.sparse.train.loop import MaskTrainer

    return MaskTrainer(cfg)


def _snapshot(root) -> dict:
    """Every path under ``root`` with its size, mtime and bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns,
                                                path.read_bytes() if path.is_file() else None)
    return out


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A finished one-step MaskLLM run of the base model."""
    root, base, data = setup
    save = str(tmp_path_factory.mktemp("run") / "run")
    with parallel.distributed(1):
        _trainer(_cfg(base, data, save)).run()
    return save


def test_training_checkpoint_is_tagged_with_its_run(setup, trained):
    run = checkpoint.read_checkpoint_meta(trained)["run"]
    assert run == {"method": "maskllm", "seq_length": 16, "global_batch_size": 4,
                   "data_prefix": os.path.abspath(setup[2]), "ce_weight": 1.0,
                   "kd_weight": 0.0, "kd_temperature": 2.0}


def test_save_into_a_converted_checkpoint_is_refused_and_leaves_it_untouched(setup):
    """The issue's case: ``--save`` = the converted checkpoint ``--load`` reads."""
    root, base, data = setup
    before = _snapshot(base)
    result = run_tool_in_process(
        "train_mask", "--load", base, "--data", data, "--save", base, "--seq-length", 16,
        "--micro-batch-size", 2, "--global-batch-size", 4, "--train-iters", 1)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --save"), result.stderr
    assert "converted checkpoint, not a maskllm training run" in lines[0]
    assert _snapshot(base) == before


@pytest.mark.parametrize("case,match", [
    ("pruned", "magnitude (one-shot or imported) checkpoint, not a maskllm training run"),
    ("other_method", "is a ast training run, not maskllm"),
    ("other_model", "training run of another model"),
])
def test_save_into_another_kind_of_checkpoint_is_refused(setup, trained, tmp_path, case, match):
    root, base, data = setup
    target = tmp_path / "target"
    if case == "pruned":
        tiny_checkpoint(str(target), mask_source="magnitude")
    elif case == "other_method":
        import shutil

        shutil.copytree(trained, target)
        meta = json.loads((target / checkpoint.ARGS_FILE).read_text())
        meta["run"]["method"] = "ast"
        (target / checkpoint.ARGS_FILE).write_text(json.dumps(meta))
    else:
        other = tiny_checkpoint(str(tmp_path / "other"), hidden_size=32)
        with parallel.distributed(1):
            _trainer(_cfg(other, data, str(target))).run()
    before = _snapshot(target)
    with parallel.distributed(1), pytest.raises(ValueError, match=re.escape(match)) as err:
        _trainer(_cfg(base, data, str(target), train_iters=2))
    assert "\n" not in str(err.value)
    assert _snapshot(target) == before


@pytest.mark.parametrize("change,match", [
    (dict(seq_length=8), "--seq-length 16 -> 8"),
    (dict(global_batch_size=8), "--global-batch-size 4 -> 8"),
    (dict(data="other_tokens"), "--data "),
    (dict(kd_weight=0.5), "--kd-weight 0.0 -> 0.5"),
    (dict(kd_temperature=1.0), "--kd-temperature 2.0 -> 1.0"),
])
def test_resume_with_other_data_settings_says_so_and_needs_override(setup, trained, change,
                                                                   match):
    root, base, data = setup
    if "data" in change:
        change = {"data": str(root / change["data"])}
    before = _snapshot(trained)
    settings = {"data": data, **change}
    cfg = _cfg(base, settings.pop("data"), trained, train_iters=2, **settings)
    with parallel.distributed(1), pytest.raises(ValueError, match=match) as err:
        _trainer(cfg)
    assert "--override-resume-config" in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(trained) == before
    with parallel.distributed(1):
        trainer = _trainer(_cfg(base, cfg.data, trained, train_iters=2,
                                override_resume_config=True, **settings))
    assert trainer.step == 1


def test_untagged_training_checkpoint_still_resumes(setup, trained, tmp_path):
    """Checkpoints written before the run tag: a train_state.json makes them a MaskLLM run."""
    import shutil

    root, base, data = setup
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    meta = json.loads((old / checkpoint.ARGS_FILE).read_text())
    del meta["run"]
    (old / checkpoint.ARGS_FILE).write_text(json.dumps(meta))
    with parallel.distributed(1):
        assert _trainer(_cfg(base, data, str(old), train_iters=2)).step == 1
        with pytest.raises(ValueError, match="--seq-length 16 -> 8"):
            _trainer(_cfg(base, data, str(old), train_iters=2, seq_length=8))
