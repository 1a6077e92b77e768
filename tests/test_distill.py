"""Distillation: the vocab-parallel KL against ``F.kl_div``, the teachers, the loss, the config."""

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.sparse import checkpoint, parallel
from megatron.sparse.layers import is_mask_key, set_mask_state, sparse_layers
from megatron.sparse.model import model_forward
from megatron.sparse.train import distill
from megatron.sparse.train.distill import (
    DistillConfig, FrozenTeacher, MaskOffTeacher, combined_loss, student_loss, vocab_parallel_kl,
)
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa
from tests.train_fixtures import tiny_checkpoint

VOCAB = 64  # shards of 32 / 16 at TP 2 / 4


def _logits(seed: int, shape=(2, 3, VOCAB)):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(shape, generator=gen)
    teacher = student + 2 * torch.randn(shape, generator=gen)  # related, as a real teacher
    weights = torch.rand(shape[:-1], generator=gen)  # a non-uniform upstream gradient
    return student, teacher, weights


def _reference(student, teacher, weights, temperature):
    """Per-token T^2 KL(p_t || p_s) and d(sum w KL)/d student, in float64 with F.kl_div."""
    s = student.double().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(s / temperature, -1),
                  F.log_softmax(teacher.double() / temperature, -1),
                  log_target=True, reduction="none").sum(-1) * temperature**2
    (kl * weights.double()).sum().backward()
    return kl.detach(), s.grad


def _sharded_kl(student, teacher, weights, temperature, tp, group):
    rank = dist.get_rank() % tp
    shard = student.chunk(tp, -1)[rank].clone().requires_grad_(True)
    kl = vocab_parallel_kl(shard, teacher.chunk(tp, -1)[rank], temperature=temperature,
                           tp_group=group)
    (kl * weights).sum().backward()
    grads = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(grads, shard.grad, group=group)
    return {"kl": kl.detach(), "grad": torch.cat(grads, -1)}


def _kl_at_tp_2_and_4(student, teacher, weights, temperature):
    """On 4 ranks: TP=4 through megatron's group (tp_group=None), TP=2 on two subgroups; chunks
    of 1 (TP=2) and 2 rows (TP=4) of the 6."""
    distill._CHUNK_ELEMENTS = 40
    rank = dist.get_rank()
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    return {4: _sharded_kl(student, teacher, weights, temperature, 4, None),
            2: _sharded_kl(student, teacher, weights, temperature, 2, halves[rank // 2])}


# fp32 against fp64: the log-sum-exps (|lse| < ~15 here) carry ~1e-6 relative error, times T^2
# = 4 -> ~1e-5 absolute on KL values of O(1..10); the gradient T (p_s - p_t) is O(1) with
# ~1e-7 relative error per softmax entry.
KL_TOL = dict(rtol=1e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1 << 22), (2.0, 4 * VOCAB)])
def test_kl_at_tp1_matches_kl_div(temperature, chunk, monkeypatch):
    monkeypatch.setattr(distill, "_CHUNK_ELEMENTS", chunk)  # 4 * VOCAB: chunks of 4 + 2 rows
    student, teacher, weights = _logits(seed=11)
    ref_kl, ref_grad = _reference(student, teacher, weights, temperature)
    s = student.clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher, temperature=temperature)
    (kl * weights).sum().backward()
    assert kl.shape == student.shape[:-1] and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref_kl, **KL_TOL)
    torch.testing.assert_close(s.grad.double(), ref_grad, **GRAD_TOL)


def test_kl_gradient_passes_gradcheck_in_float64():
    student, teacher, _ = _logits(seed=3, shape=(2, 8))
    s = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_kl(x, teacher.double(), temperature=2.0), (s,))


def test_kl_is_zero_for_identical_and_stable_for_large_logits():
    student, teacher, weights = _logits(seed=5)
    s = (student + 1e4).requires_grad_(True)  # exp() would overflow without the max shift
    kl = vocab_parallel_kl(s, student + 1e4, temperature=2.0)
    kl.sum().backward()
    assert torch.equal(kl, torch.zeros_like(kl)) and torch.equal(s.grad, torch.zeros_like(s))
    shifted = vocab_parallel_kl(student + 1e4, teacher + 1e4, temperature=2.0)
    ref, _ = _reference(student, teacher, weights, 2.0)  # softmax is shift invariant
    # the 1e4 offset costs fp32 resolution: ulp(1e4) ~ 1e-3 on each logit
    torch.testing.assert_close(shifted.double(), ref, rtol=0, atol=5e-3)


@pytest.mark.slow  # four spawned ranks: ~25 s of interpreter and megatron-core start-up
def test_kl_at_tp2_and_tp4_matches_the_unsharded_reference():
    student, teacher, weights = _logits(seed=7)
    ref_kl, ref_grad = _reference(student, teacher, weights, 2.0)
    got = run_distributed(_kl_at_tp_2_and_4, 4, student, teacher, weights, 2.0)
    for tp in (2, 4):
        torch.testing.assert_close(got[tp]["kl"].double(), ref_kl, **KL_TOL)
        torch.testing.assert_close(got[tp]["grad"].double(), ref_grad, **GRAD_TOL)


def test_combined_loss_is_the_weighted_sum_of_token_means():
    student, teacher, _ = _logits(seed=13)
    ce = torch.rand(student.shape[:-1], generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(ce_weight=0.7, kd_weight=0.5, kd_temperature=2.0)
    kl, _ = _reference(student, teacher, torch.ones(ce.shape), 2.0)
    loss, parts = combined_loss(ce, student, teacher, cfg)
    torch.testing.assert_close(loss.double(), 0.7 * ce.double().mean() + 0.5 * kl.mean(),
                               **KL_TOL)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    loss, parts = combined_loss(ce, student, teacher, cfg, loss_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(parts["kd"].double(), kl[keep].mean(), **KL_TOL)
    torch.testing.assert_close(parts["ce"], ce[keep].mean())
    plain, parts = combined_loss(ce, None, None, DistillConfig())
    assert torch.equal(plain, ce.mean()) and set(parts) == {"ce"}


def _tokens(seed: int, vocab: int, shape=(2, 12)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, shape, generator=gen),
            torch.randint(0, vocab, shape, generator=gen))


def _masked_student():
    """A tiny logits-mask model in training mode, logits far from uniform (masks matter)."""
    torch.manual_seed(0)
    args = tiny_gqa()
    model = args.build(mask_kind="logits")
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.mask_logits.normal_(0.0, 1.0)
    model.train()
    set_mask_state(model, tau=0.5, kappa=1.0, noise_seed=42)
    return args, model


def test_mask_off_teacher_is_the_dense_model_and_leaves_the_student_alone():
    with parallel.distributed(1):
        args, student = _masked_student()
        dense = args.build(sparse=False)
        missing, unexpected = dense.load_state_dict(
            {k: v for k, v in student.state_dict().items() if not is_mask_key(k)}, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        tokens, _ = _tokens(0, args.vocab_size)
        before = model_forward(student, tokens).detach()
        teacher = MaskOffTeacher(student).logits(tokens)
        after = model_forward(student, tokens).detach()
        with torch.no_grad():
            reference = model_forward(dense.eval(), tokens)
    assert not teacher.requires_grad
    # same weights, same kernels: only summation order could differ
    torch.testing.assert_close(teacher, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, reference, atol=1e-2)  # the student's masks do bite
    assert torch.equal(before, after)  # same noise seed, masks re-enabled
    assert all(layer.mask_state.enabled for _, layer in sparse_layers(student))


def _mask_grads(model):
    grads = [layer.mask_logits.grad.clone() for _, layer in sparse_layers(model)]
    model.zero_grad(set_to_none=True)
    return grads


def test_student_loss_is_ce_plus_kd_from_one_forward():
    with parallel.distributed(1):
        args, student = _masked_student()  # a fixed noise seed: every forward draws one mask
        tokens, labels = _tokens(1, args.vocab_size)
        plain = model_forward(student, tokens, labels)
        ce_only, _ = student_loss(student, tokens, labels, DistillConfig())
        assert torch.equal(ce_only, plain.float().mean())  # kd_weight 0: today's loss exactly
        cfg = DistillConfig(ce_weight=1.0, kd_weight=0.5, kd_temperature=2.0)
        student.zero_grad(set_to_none=True)
        loss, parts = student_loss(student, tokens, labels, cfg, MaskOffTeacher(student))
        loss.backward()
        grads = _mask_grads(student)
        # reference: plain PyTorch losses on the full logits of a second, identical forward
        teacher = MaskOffTeacher(student).logits(tokens)
        logits = model_forward(student, tokens)
        flat = logits.reshape(-1, args.vocab_size)
        ref_ce = F.cross_entropy(flat, labels.reshape(-1))
        ref_kd = F.kl_div(F.log_softmax(flat / 2.0, -1),
                          F.log_softmax(teacher.reshape(-1, args.vocab_size) / 2.0, -1),
                          log_target=True, reduction="none").sum(-1).mean() * 4.0
        (ref_ce + 0.5 * ref_kd).backward()
        ref_grads = _mask_grads(student)
    torch.testing.assert_close(parts["ce"], ref_ce, **KL_TOL)
    torch.testing.assert_close(parts["ce"], plain.mean())  # megatron's CE, from the logits
    torch.testing.assert_close(parts["kd"], ref_kd, **KL_TOL)
    torch.testing.assert_close(loss, ref_ce + 0.5 * ref_kd, **KL_TOL)
    for got, want in zip(grads, ref_grads):
        assert want.abs().sum() > 0
        # both fp32; the two paths differ in summation order only (~1e-6 relative)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {"base": tiny_checkpoint(str(root / "base"))}
    for name, overrides in (("vocab", {"vocab_size": 128}), ("hidden", {"hidden_size": 32})):
        # model_args.json only: the mismatch must be refused before any weight is read
        checkpoint.write_model_args(root / name, tiny_gqa(**overrides))
        out[name] = str(root / name)
    return out


def test_frozen_teacher_loads_the_dense_weights_frozen(checkpoints):
    with parallel.distributed(1):
        args = checkpoint.read_model_args(checkpoints["base"])
        teacher = FrozenTeacher.from_checkpoint(checkpoints["base"], like=args)
        dense = args.build(sparse=False)
        checkpoint.load_into(checkpoints["base"], dense)
        tokens, _ = _tokens(2, args.vocab_size)
        got = teacher.logits(tokens)
        with torch.no_grad():
            want = model_forward(dense.eval(), tokens)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,match", [("vocab", "vocabulary of 128 tokens, the student 256"),
                                        ("hidden", "another model (hidden 32")])
def test_a_teacher_of_another_model_is_a_one_line_error(checkpoints, name, match):
    like = checkpoint.read_model_args(checkpoints["base"])
    with pytest.raises(ValueError, match=re.escape(match)) as err:
        FrozenTeacher.from_checkpoint(checkpoints[name], like=like)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields,match", [
    (dict(kd_weight=-0.1), "--kd-weight must be >= 0"),
    (dict(ce_weight=-1.0), "--ce-weight must be >= 0"),
    (dict(ce_weight=0.0, kd_weight=0.0), "both 0"),
    (dict(kd_weight=1.0, kd_temperature=0.0), "--kd-temperature must be > 0"),
    (dict(kd_weight=float("nan")), "finite"),
])
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**fields)


def _losses(cfgs):
    """Per step ``[loss, loss/ce, loss/kd]`` of a mask-learning run of each config."""
    from megatron.sparse.train.loop import MaskTrainer

    runs = []
    for cfg in cfgs:
        trainer = MaskTrainer(cfg)
        steps = []
        while trainer.step < cfg.train_iters:
            values = trainer.train_step(trainer.step)
            trainer.step += 1
            steps.append([values["loss"], values.get("loss/ce", values["loss"]),
                          values.get("loss/kd", 0.0)])
        runs.append(steps)
    return runs


@pytest.mark.slow
def test_mask_learning_with_kd_gives_the_same_losses_at_tp1_and_tp2(checkpoints, tmp_path):
    from tests.test_train import _cfg
    from tests.train_fixtures import write_tokens

    write_tokens(str(tmp_path / "tokens"), docs=40, doc_len=50, vocab=256)
    kd = _cfg(checkpoints["base"], str(tmp_path / "tokens"), kd_weight=0.5, kd_temperature=2.0)
    plain = _cfg(checkpoints["base"], str(tmp_path / "tokens"))
    ref, no_kd = run_distributed(_losses, 1, [kd, plain])
    (got,) = run_distributed(_losses, 2, [kd])
    ref, got = torch.tensor(ref, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    assert ref.shape == (3, 3) and bool((ref[:, 2] > 0).all())
    torch.testing.assert_close(ref[:, 0], ref[:, 1] + 0.5 * ref[:, 2], rtol=1e-6, atol=0)
    # the teacher forward leaves the student's sampling alone: step 0 has the plain run's CE
    assert ref[0, 1].item() == no_kd[0][0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # as test_train's TP parity


def test_kl_of_bf16_student_logits_is_computed_in_fp32():
    student, teacher, weights = _logits(seed=17)
    low = student.bfloat16()
    ref_kl, ref_grad = _reference(low.float(), teacher, weights, 2.0)  # the rounded inputs
    s = low.clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher, temperature=2.0)
    (kl * weights).sum().backward()
    assert kl.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl.double(), ref_kl, **KL_TOL)
    # the gradient is rounded to bf16 (8 bits of mantissa: 4e-3 relative)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-2, atol=1e-3)
