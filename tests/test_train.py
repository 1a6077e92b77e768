"""Mask learning: TP/DP parity, frozen weights, exact resume after SIGKILL, bad inputs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron.sparse import checkpoint, parallel
from megatron.sparse.layers import sparse_layers
from megatron.sparse.train.config import TrainConfig
from megatron.sparse.train.metrics import HISTORY_FILE, MetricsLogger, read_history
from tests.distributed import run_distributed
from tests.train_fixtures import tiny_checkpoint, write_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = tiny_checkpoint(str(root / "base"))
    write_tokens(str(root / "tokens"), docs=40, doc_len=50, vocab=256)
    return root, base, str(root / "tokens")


def _cfg(base, data, **kw) -> TrainConfig:
    fields = dict(load=base, data=data, seq_length=16, micro_batch_size=2, global_batch_size=4,
                  train_iters=3, tau_start=2.0, tau_end=0.5, kappa_start=5.0, kappa_end=10.0,
                  lr=1e-2, min_lr=1e-3, logits_lr_mult=1.0, reg_lambda=1e-3, seed=7)
    fields.update(kw)
    return TrainConfig(**fields)


def _train(cfg: TrainConfig):
    from megatron.sparse.convert.sharding import merge_state_dicts
    from megatron.core import parallel_state
    import torch.distributed as dist
    from megatron.sparse.train.loop import MaskTrainer

    trainer = MaskTrainer(cfg)
    before = {n: l.weight.detach().clone() for n, l in sparse_layers(trainer.model)}
    logits0 = {n: l.mask_logits.detach().clone() for n, l in sparse_layers(trainer.model)}
    losses = []
    while trainer.step < cfg.train_iters:
        losses.append(trainer.train_step(trainer.step)["loss"])
        trainer.step += 1
    unchanged = all(torch.equal(before[n], l.weight) for n, l in sparse_layers(trainer.model))
    moved = all(not torch.equal(logits0[n], l.mask_logits) for n, l in sparse_layers(trainer.model))
    local = {f"{n}.mask_logits": l.mask_logits.detach().clone()
             for n, l in sparse_layers(trainer.model)}
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return {"losses": losses, "weights_unchanged": unchanged, "logits_moved": moved,
            "logits": merge_state_dicts(shards)}


def test_tp_and_dp_give_the_same_losses(setup):
    root, base, data = setup
    cfg = _cfg(base, data)  # Gumbel noise on: samples depend on (step, global micro batch) only
    ref = run_distributed(_train, 1, cfg)
    assert ref["weights_unchanged"] and ref["logits_moved"]
    assert len(ref["losses"]) == 3 and all(l > 0 for l in ref["losses"])
    for world, tp in ((2, 2), (2, 1)):  # TP=2; DP=2 (TP=1)
        got = run_distributed(_train, world, cfg, tp=tp)
        assert got["weights_unchanged"] and got["logits_moved"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-5, atol=1e-6)
        for key, value in ref["logits"].items():
            torch.testing.assert_close(got["logits"][key], value, rtol=1e-4, atol=1e-5)


def _launch(args, log, *, nproc: int = 2):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(REPO / "tools" / "train_mask.py"), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _load_logits(root: str):
    from megatron.core.dist_checkpointing import load_plain_tensors

    path = checkpoint.resolve_iteration(root)
    return {k: v for k, v in load_plain_tensors(str(path)).items() if k.endswith("mask_logits")}


def _final_logits(root: str):
    return run_distributed(_load_logits, 1, root)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(setup, tmp_path):
    root, base, data = setup
    common = ["--load", base, "--data", data, "--seq-length", "16", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "6", "--save-interval", "2",
              "--lr", "1e-2", "--seed", "3", "--tp", "2", "--tau-start", "2", "--tau-end", "0.5",
              "--kappa-start", "5", "--kappa-end", "10"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with open(tmp_path / "full.log", "w") as log:
        assert _launch([*common, "--save", str(full)], log).wait(timeout=600) == 0
    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch([*common, "--save", str(killed)], log)
        deadline = time.time() + 600
        while checkpoint.latest_iteration(killed) is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.latest_iteration(killed)
    assert killed_at is not None and killed_at < 6, (tmp_path / "killed.log").read_text()
    with open(tmp_path / "resume.log", "w") as log:  # same command: resumes from --save
        assert _launch([*common, "--save", str(killed)], log).wait(timeout=600) == 0
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    a, b = _final_logits(str(full)), _final_logits(str(killed))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(setup, tmp_path):
    root, base, data = setup
    args = ["--load", base, "--data", data, "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "100000",
            "--save", str(tmp_path / "run"), "--log-interval", "1"]
    with open(tmp_path / "term.log", "w") as log:  # the signal Slurm sends before preempting
        proc = _launch(args, log, nproc=1)
        deadline = time.time() + 300
        while "step 2/" not in (tmp_path / "term.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, (tmp_path / "term.log").read_text()
    step = checkpoint.latest_iteration(tmp_path / "run")
    assert step is not None and step >= 2
    assert "preempted" in (tmp_path / "term.log").read_text()
    assert (checkpoint.iteration_dir(tmp_path / "run", step) / "train_state.json").is_file()


def _expect_error(cfg):
    from megatron.sparse.train.loop import MaskTrainer

    try:
        MaskTrainer(cfg)
    except (ValueError, FileNotFoundError) as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case,match", [
    ("short", "fewer than one global batch"),
    ("indivisible", "not divisible by --micro-batch-size"),
    ("missing", "not a megatron-sparse checkpoint"),
    ("other_prior", "another model"),
])
def test_bad_inputs_are_clear_errors(setup, tmp_path, case, match):
    root, base, data = setup
    if case == "short":
        write_tokens(str(tmp_path / "short"), docs=2, doc_len=10, vocab=256)
        cfg = _cfg(base, str(tmp_path / "short"))
    elif case == "indivisible":
        cfg = _cfg(base, data, global_batch_size=5)
    elif case == "missing":
        cfg = _cfg(str(tmp_path / "nothing"), data)
    else:
        other = tiny_checkpoint(str(tmp_path / "other"), hidden_size=32)
        cfg = _cfg(base, data, prior=other)
    with parallel.distributed(1):  # in-process: the errors come before any training
        message = _expect_error(cfg)
    assert message is not None and match in message, message


def test_history_reads_back_what_the_logger_wrote(tmp_path):
    logger = MetricsLogger(enabled=True, total_steps=2, tensorboard_dir=None,
                           history_path=str(tmp_path / HISTORY_FILE), wandb_project=None,
                           config={})
    logger.scalars(1, {"loss": 4.5, "lr": 0.01})
    logger.scalars(2, {"eval_ppl": 91.5})
    logger.close()
    assert read_history(tmp_path) == [{"step": 1, "loss": 4.5, "lr": 0.01},
                                      {"step": 2, "eval_ppl": 91.5}]


def _throughput_with_slow_evals(cfg: TrainConfig):
    from megatron.sparse.train.loop import MaskTrainer

    trainer = MaskTrainer(cfg)
    trainer.eval_windows = torch.zeros(1)  # evaluate after every step, slowly
    trainer.evaluate = lambda step: time.sleep(EVAL_SECONDS)
    trainer.run()
    return [r["tokens_per_s"] for r in read_history(cfg.save) if "tokens_per_s" in r]


EVAL_SECONDS = 2.0


def test_tokens_per_second_counts_training_steps_only(setup, tmp_path):
    root, base, data = setup
    cfg = _cfg(base, data, train_iters=4, eval_interval=1, log_interval=1, save=str(tmp_path))
    rates = run_distributed(_throughput_with_slow_evals, 1, cfg)
    assert len(rates) == 4
    # A window that included an evaluation lasted over EVAL_SECONDS, so its rate is under
    # tokens / EVAL_SECONDS; a tiny model's step (even the first, with its one-time warm-up, ~0.4 s
    # on 2 cores) is far shorter.
    ceiling_with_eval = cfg.global_batch_size * cfg.seq_length / EVAL_SECONDS
    assert min(rates) > ceiling_with_eval, rates
    assert max(rates) > 4 * ceiling_with_eval, rates  # the steady-state windows: steps only


def test_keep_checkpoints_deletes_only_older_iterations(setup, tmp_path):
    """``--keep-checkpoints 2`` with a save every 2 of 6 steps leaves iterations 4 and 6 (and
    everything else in ``--save``), and the run still resumes from the newest."""
    from tests.tools import run_tool_in_process

    root, base, data = setup
    run = tmp_path / "run"
    common = ["--load", base, "--data", data, "--seq-length", 16, "--micro-batch-size", 2,
              "--global-batch-size", 4, "--save-interval", 2, "--keep-checkpoints", 2,
              "--save", run]
    result = run_tool_in_process("train_mask", *common, "--train-iters", 6)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert checkpoint.latest_iteration(run) == 6 and (run / "model_args.json").is_file()
    result = run_tool_in_process("train_mask", *common, "--train-iters", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000006", "iter_0000008"]
    result = run_tool_in_process("train_mask", *common[:-4], "--keep-checkpoints=-1",
                                 "--save", tmp_path / "bad", "--train-iters", 2)
    assert result.returncode != 0 and "--keep-checkpoints must be >= 0" in result.stderr


def test_remove_old_iterations_never_removes_the_latest(tmp_path):
    for it in (2, 4, 6):
        checkpoint.iteration_dir(tmp_path, it).mkdir()
    (tmp_path / "iter_notes").mkdir()
    (tmp_path / checkpoint.LATEST_FILE).write_text("2")  # e.g. a rolled-back run
    removed = checkpoint.remove_old_iterations(tmp_path, keep=1)
    assert [p.name for p in removed] == ["iter_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "iter_0000002", "iter_0000006", "iter_notes"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.remove_old_iterations(tmp_path, keep=0)
