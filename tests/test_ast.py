"""Adaptive sparse training: the SR-STE update, the masks, straight-through gradients, TP parity,
exact resume after SIGKILL, eval/export of its checkpoints, and bad inputs."""

import json
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
from megatron.sparse.train.config import AstConfig, TrainConfig
from megatron.sparse.train.srste import SRSTEAdamW
from tests.distributed import run_distributed
from tests.tools import run_tool_in_process
from tests.train_fixtures import tiny_checkpoint, write_tokens

REPO = Path(__file__).resolve().parents[1]


# -- the optimizer against the formula ---------------------------------------------------------
def _reference_run(w0, grads, masks, decays, *, lr, betas, eps, wd, mode):
    """The SR-STE AdamW update written out per step with plain tensors (docs/ast.md)."""
    b1, b2 = betas
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, (g, keep, lam) in enumerate(zip(grads, masks, decays), start=1):
        w = w * (1 - lr * wd)
        decay = lam * (~keep).float() * w
        if mode == "gradient":
            g = g + decay
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            u = m
        else:
            m = b1 * m + (1 - b1) * g
            u = m + decay
            v = b2 * v + (1 - b2) * u * u
        w = w - lr / (1 - b1 ** t) * u / ((v / (1 - b2 ** t)).sqrt() + eps)
    return w


@pytest.mark.parametrize("mode", ["adam", "gradient"])
def test_srste_update_equals_the_formula(mode):
    gen = torch.Generator().manual_seed(11)
    steps, shape = 6, (8, 16)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * 1e-2 for _ in range(steps)]
    masks = [torch.rand(shape, generator=gen) > 0.5 for _ in range(steps)]  # change every step
    lam_max, ramp = 0.5, 3
    decays = [lam_max * min(1.0, t / ramp) for t in range(steps)]  # lambda(t) at 0-based t
    dense0 = torch.randn(5, generator=gen)
    dense_grads = [torch.randn(5, generator=gen) for _ in range(steps)]
    weight, dense = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(dense0.clone())
    current = {}
    opt = SRSTEAdamW([{"params": [weight, dense]}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                     weight_decay=0.1, mode=mode,
                     pruned_mask=lambda p: ~current["keep"] if p is weight else None)
    from megatron.sparse.train.ast import srste_decay

    for t in range(steps):
        current["keep"] = masks[t]
        weight.grad, dense.grad = grads[t].clone(), dense_grads[t].clone()
        for group in opt.param_groups:
            group["srste_decay"] = srste_decay(t, decay=lam_max, warmup=ramp)
        opt.step()
    expected = _reference_run(w0, grads, masks, decays, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                              wd=0.1, mode=mode)
    # the same float32 operations in another order: a few ulp of |w| ~ 1 per step
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    # a dense parameter is plain AdamW in both modes
    ref = torch.nn.Parameter(dense0.clone())
    adamw = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in dense_grads:
        ref.grad = g.clone()
        adamw.step()
    torch.testing.assert_close(dense.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    # the decay only touches pruned entries: with no gradient, kept weights keep their value
    w = torch.nn.Parameter(w0.clone())
    keep = masks[0]
    only_decay = SRSTEAdamW([{"params": [w], "srste_decay": 0.5}], lr=1e-2, mode=mode,
                            pruned_mask=lambda p: ~keep)
    w.grad = torch.zeros(shape)
    only_decay.step()
    assert torch.equal(w.detach()[keep], w0[keep])
    assert ((w.detach() - w0)[~keep] * w0[~keep] < 0).all()  # pruned weights move toward 0


def test_ramp():
    from megatron.sparse.train.ast import srste_decay

    assert [srste_decay(t, decay=6e-5, warmup=3000) for t in (0, 1500, 3000, 9000)] == \
        [0.0, 3e-5, 6e-5, 6e-5]
    assert srste_decay(0, decay=6e-5, warmup=0) == 6e-5


# -- the trainer on a tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ast")
    base = tiny_checkpoint(str(root / "base"))
    write_tokens(str(root / "tokens"), docs=40, doc_len=50, vocab=256)
    return root, base, str(root / "tokens")


def _cfg(base, data, **kw) -> AstConfig:
    fields = dict(load=base, data=data, seq_length=16, micro_batch_size=2, global_batch_size=4,
                  train_iters=4, lr=1e-2, min_lr=1e-3, warmup_iters=0, mask_interval=2,
                  srste_decay=0.05, srste_warmup_iters=2, kd_weight=0.0, seed=7)
    fields.update(kw)
    return AstConfig(**fields)


def _keep_top2(w: torch.Tensor) -> torch.Tensor:
    """Independent magnitude 2:4: the two largest |w| of each group of 4 (ties: lower index)."""
    groups = w.abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for j in range(4):  # rank of entry j within its group: how many beat it
        beat = sum(((groups[..., i] > groups[..., j]) | ((groups[..., i] == groups[..., j])
                                                         & (i < j))).int()
                   for i in range(4) if i != j)
        keep[..., j] = beat < 2
    return keep.reshape(w.shape)


def _train_and_watch(cfg):
    from megatron.core import parallel_state
    import torch.distributed as dist
    from megatron.sparse.convert.sharding import merge_state_dicts
    from megatron.sparse.train.loop import Trainer

    trainer = Trainer(cfg)
    layers = sparse_layers(trainer.model)
    report = {"losses": [], "masks_follow_magnitude": True, "masks_fixed_between": True,
              "pruned_grads": True}
    masks = [l.eval_mask().clone() for _, l in layers]
    assert all(torch.equal(m, _keep_top2(l.weight.detach())) for m, (_, l) in zip(masks, layers))
    while trainer.step < cfg.train_iters:
        before = [l.weight.detach().clone() for _, l in layers]
        report["losses"].append(trainer.train_step(trainer.step)["loss"])
        trainer.step += 1
        for i, (_, layer) in enumerate(layers):
            pruned = ~masks[i]
            report["pruned_grads"] &= bool((layer.weight.grad[pruned] != 0).any())
            report["pruned_grads"] &= not torch.equal(layer.weight.detach()[pruned],
                                                      before[i][pruned])
        now = [l.eval_mask().clone() for _, l in layers]
        if trainer.step % cfg.mask_interval == 0:
            report["masks_follow_magnitude"] &= all(
                torch.equal(m, _keep_top2(l.weight.detach())) for m, (_, l) in zip(now, layers))
        else:
            report["masks_fixed_between"] &= all(map(torch.equal, now, masks))
        masks = now
    local = {f"{n}.weight": l.weight.detach().clone() for n, l in layers}
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    report["weights"] = merge_state_dicts(shards)
    return report


def test_masks_follow_magnitude_and_pruned_weights_learn(setup):
    root, base, data = setup
    with parallel.distributed(1):
        report = _train_and_watch(_cfg(base, data, train_iters=3))
    assert report["masks_follow_magnitude"] and report["masks_fixed_between"]
    assert report["pruned_grads"]


@pytest.mark.slow
def test_tp1_and_tp2_give_the_same_run(setup):
    root, base, data = setup
    # Adam divides by sqrt(v) + eps: with eps 1e-8 a weight whose gradient is ~0 moves by ~lr
    # in a direction set by rounding; eps 1e-4 bounds the update's sensitivity to a gradient
    # rounding difference d by lr * d / eps = 100 d per step. TP=2 sums the products in another
    # order (d up to ~1e-8 on gradients ~1e-2), so 4 steps differ by at most ~4e-6: atol 1e-5.
    cfg = _cfg(base, data, adam_eps=1e-4)
    ref = run_distributed(_train_and_watch, 1, cfg)
    got = run_distributed(_train_and_watch, 2, cfg)  # TP=2
    assert got["masks_follow_magnitude"] and got["masks_fixed_between"] and got["pruned_grads"]
    # TP=2 sums the row-parallel products in another order: float32 rounding, ~1e-6 relative
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                               rtol=1e-5, atol=1e-6)
    for key, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][key], value, rtol=1e-4, atol=1e-5)


def _launch(tool, args, log, *, nproc: int = 2):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    return subprocess.Popen([*launcher, str(REPO / "tools" / f"{tool}.py"), *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _load_tensors(root: str):
    from megatron.core.dist_checkpointing import load_plain_tensors

    return dict(load_plain_tensors(str(checkpoint.resolve_iteration(root))))


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(setup, tmp_path):
    root, base, data = setup
    common = ["--load", base, "--data", data, "--seq-length", "16", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "6", "--save-interval", "2",
              "--mask-interval", "3", "--lr", "1e-2", "--warmup-iters", "0", "--srste-decay",
              "0.05", "--srste-warmup-iters", "4", "--kd-weight", "0.5", "--slorb-k", "16",
              "--slorb-train-projection", "--tp", "2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with open(tmp_path / "full.log", "w") as log:
        assert _launch("train_ast", [*common, "--save", str(full)], log).wait(timeout=600) == 0
    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch("train_ast", [*common, "--save", str(killed)], log)
        deadline = time.time() + 600
        while checkpoint.latest_iteration(killed) is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.latest_iteration(killed)
    assert killed_at is not None and killed_at < 6, (tmp_path / "killed.log").read_text()
    with open(tmp_path / "resume.log", "w") as log:  # the same command resumes from --save
        assert _launch("train_ast", [*common, "--save", str(killed)], log).wait(timeout=600) == 0
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    a, b = run_distributed(_load_tensors, 1, str(full)), run_distributed(_load_tensors, 1,
                                                                        str(killed))
    assert a.keys() == b.keys() and any(k.endswith("mask_choice") for k in a)
    assert any(k.endswith("slorb.S") for k in a) and any(k.endswith("slorb.X") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("mask_flip" in r and "mask_flip_init" in r for r in history if "loss" in r)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    root, base, data = setup
    save = str(tmp_path_factory.mktemp("astrun") / "run")
    with parallel.distributed(1):
        from megatron.sparse.train.loop import Trainer

        Trainer(_cfg(base, data, save=save, train_iters=2)).run()
    return save


def test_checkpoint_is_a_fixed_mask_checkpoint(trained):
    meta = checkpoint.read_checkpoint_meta(trained)
    assert meta["mask_source"] == "ast" and meta["mask_storage"] == "fixed"
    assert meta["run"]["method"] == "ast"
    with parallel.distributed(1):
        model, _ = checkpoint.load_model(trained)
        for _, layer in sparse_layers(model):  # eval/export/prune read the stored masks
            assert layer.mask_kind == "fixed"
            assert torch.equal(layer.eval_mask(), _keep_top2(layer.weight.detach()))


def _stamps(target):
    return {p: p.stat().st_mtime_ns for p in Path(target).rglob("*")} if target else {}


@pytest.mark.parametrize("case,match", [
    ("interval", "--mask-interval 0"),
    ("slorb_k", "SLoRB k=3 does not divide"),
    ("teacher", "is a checkpoint of another model"),
    ("ast_with_train_mask", "is a ast training run, not maskllm"),
    ("train_mask_with_ast", "is a maskllm training run, not ast"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(setup, trained, tmp_path, case,
                                                          match):
    root, base, data = setup
    common = ["--load", base, "--data", data, "--seq-length", 16, "--micro-batch-size", 2,
              "--global-batch-size", 4, "--train-iters", 3]
    tool, target = "train_ast", None
    if case == "ast_with_train_mask":
        tool, target = "train_mask", trained
    elif case == "train_mask_with_ast":
        target = str(tmp_path / "maskllm")
        with parallel.distributed(1):
            from megatron.sparse.train.loop import Trainer

            Trainer(TrainConfig(load=base, data=data, save=target, seq_length=16,
                                micro_batch_size=2, global_batch_size=4, train_iters=1)).run()
    before = _stamps(target)
    extra = {"interval": ["--mask-interval", 0], "slorb_k": ["--slorb-k", 3],
             "teacher": ["--kd-weight", 0.5, "--teacher",
                         tiny_checkpoint(str(tmp_path / "other"), hidden_size=32)]}.get(
                             case, ["--save", target])
    result = run_tool_in_process(tool, *common, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert _stamps(target) == before


def _megatron_ppl(root, windows):
    from megatron.sparse.eval.perplexity import megatron_perplexity

    model, _ = checkpoint.load_model(root)
    return megatron_perplexity(model, windows).ppl


@pytest.mark.slow  # a conversion, a run and an export (~30 s)
def test_eval_and_hf_export_of_an_ast_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron.sparse.eval.hf_perplexity import hf_perplexity
    from megatron.sparse.mask import is_two_four
    from tests.hf_tiny import tiny_hf_model

    tiny_hf_model("llama2_mha").save_pretrained(tmp_path / "hf")
    assert run_tool_in_process("convert_hf_to_megatron", "--hf", tmp_path / "hf", "--tp", 1,
                               "--out", tmp_path / "dense").returncode == 0
    write_tokens(str(tmp_path / "tokens"), docs=30, doc_len=40, vocab=128)
    cfg = _cfg(str(tmp_path / "dense"), str(tmp_path / "tokens"), save=str(tmp_path / "ast"),
               train_iters=2, mask_interval=1)
    with parallel.distributed(1):
        from megatron.sparse.train.loop import Trainer

        Trainer(cfg).run()
    result = run_tool_in_process("export_hf", "--load", tmp_path / "ast", "--out",
                                 tmp_path / "export")
    assert result.returncode == 0, result.stderr
    windows = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    with parallel.distributed(1):
        megatron_ppl = _megatron_ppl(str(tmp_path / "ast"), windows)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    # the same float32 model in two implementations: PPL agrees to ~1e-5 relative
    assert abs(hf_perplexity(exported, windows).ppl / megatron_ppl - 1) < 1e-3
    for name, weight in exported.state_dict().items():
        if name.endswith("proj.weight"):
            assert is_two_four(weight != 0), name  # trained weights, exported 2:4
