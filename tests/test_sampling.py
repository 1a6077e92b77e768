"""The training-mask sample: fused CPU kernel vs the PyTorch path vs autograd through the formula."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from megatron.sparse import cpu_kernels, sampling
from megatron.sparse import mask as M

ROWS, COLS = 24, 88  # 22 groups: one full block of 16 groups and a partial one


def _plain_mask(logits, index, sample):
    """softmax((kappa l + g) / tau) @ S by autograd, noise from the counters (independent of
    mask.soft_mask and of the kernel)."""
    scores = sample.kappa * logits
    if sample.noise:
        scores = scores + M.gumbel_noise(sample.seed, index.logit_counters(logits.shape[1]))
    probs = torch.softmax(scores / sample.tau, dim=-1)
    soft = probs @ M.candidate_matrix()
    if sample.hard:
        hard = M.candidate_matrix()[probs.argmax(-1)]
        soft = hard + soft - soft.detach()
    return M.groups_to_weight(soft)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=gen)
    logits = (torch.randn(ROWS, COLS // 4, 6, generator=gen) * 0.5).requires_grad_(True)
    return weight, logits


def _grads(fn, weight, logits, grad_out):
    logits.grad = None
    if weight.requires_grad:
        weight.grad = None
    out = fn()
    (out * grad_out).sum().backward() if out.dim() else out.backward()
    return out.detach(), logits.grad.clone(), None if weight.grad is None else weight.grad.clone()


needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("tau,kappa", [(0.7, 3.0), (0.5, 40.0)])  # 40/0.5: many exps underflow
def test_fused_kernel_matches_torch_path_and_plain_autograd(hard, noise, trainable, tau, kappa):
    weight, logits = _inputs()
    weight.requires_grad_(trainable)
    index = sampling.NoiseIndex.contiguous(ROWS, COLS // 4, row_offset=40, total_groups=30)
    sample = sampling.MaskSample(seed=4242, tau=tau, kappa=kappa, hard=hard, noise=noise)
    grad_out = torch.randn(ROWS, COLS)
    assert sampling._fused(weight, logits)
    fused = _grads(lambda: sampling.masked_weight(weight, logits, index, sample)[0],
                   weight, logits, grad_out)
    torch_path = _grads(lambda: sampling.torch_masked_weight(weight, logits, index, sample),
                        weight, logits, grad_out)
    plain = _grads(lambda: weight * _plain_mask(logits, index, sample), weight, logits, grad_out)
    for ref in (torch_path, plain):
        torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-4)
        if trainable:
            torch.testing.assert_close(fused[2], ref[2], rtol=1e-5, atol=1e-5)
        else:
            assert fused[2] is None
    assert fused[1].abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_loss", [False, True])
def test_fused_regulariser_matches_formula(hard, with_loss):
    """The forward's regulariser and the joint backward of loss + reg match plain autograd; the
    regulariser sends no gradient into a trainable weight (sg(W))."""
    weight, logits = _inputs(1)
    weight.requires_grad_(True)
    index = sampling.NoiseIndex.contiguous(ROWS, COLS // 4)
    sample = sampling.MaskSample(seed=99, tau=1.3, kappa=2.0, hard=hard)
    grad_out = torch.randn(ROWS, COLS) if with_loss else torch.zeros(ROWS, COLS)

    def objective(value, sq_norm):
        return (value * grad_out).sum() - 0.3 * sq_norm if with_loss else -0.3 * sq_norm

    def fused():
        value, sq_norm = sampling.masked_weight(weight, logits, index, sample)
        return objective(value, sq_norm), sq_norm

    def plain():
        mask = _plain_mask(logits, index, sample)
        return objective(weight * mask, (weight.detach() * mask).pow(2).sum()), None

    results = []
    for fn in (fused, plain):
        logits.grad = weight.grad = None
        total, sq_norm = fn()
        total.backward()
        results.append((total.detach(), logits.grad.clone(), weight.grad, sq_norm))
    (f_total, f_logits, f_weight, f_sq), (p_total, p_logits, p_weight, _) = results
    torch.testing.assert_close(f_total, p_total, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f_logits, p_logits, rtol=1e-4, atol=1e-4)
    if with_loss:
        torch.testing.assert_close(f_weight, p_weight, rtol=1e-5, atol=1e-5)
    else:
        assert p_weight is None and f_weight is None
    recomputed = sampling.masked_weight_sq_norm(weight, logits, index, sample)
    torch.testing.assert_close(f_sq.detach(), recomputed.detach(), rtol=1e-5, atol=1e-4)
    assert f_logits.abs().sum() > 0


@needs_kernel
def test_fused_sample_is_reproducible_and_depends_on_seed():
    weight, logits = _inputs(2)
    index = sampling.NoiseIndex.contiguous(ROWS, COLS // 4)
    first, _ = sampling.masked_weight(weight, logits, index, sampling.MaskSample(1, 1.0, 1.0))
    again, _ = sampling.masked_weight(weight, logits, index, sampling.MaskSample(1, 1.0, 1.0))
    other, _ = sampling.masked_weight(weight, logits, index, sampling.MaskSample(2, 1.0, 1.0))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_kernel_switch_and_broken_compiler_fall_back_to_torch(monkeypatch, tmp_path):
    weight, logits = _inputs(3)
    monkeypatch.setenv("MEGATRON_SPARSE_CACHE", str(tmp_path))
    try:
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "torch")
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is None and not sampling._fused(weight, logits)
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        cpu_kernels.load.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernels.load() is None
        assert any("PyTorch path" in str(w.message) for w in caught)
        sample = sampling.MaskSample(seed=5, tau=1.0, kappa=2.0)
        index = sampling.NoiseIndex.contiguous(ROWS, COLS // 4)
        out, sq_norm = sampling.masked_weight(weight, logits, index, sample)
        assert sq_norm is None  # the PyTorch path recomputes the regulariser on demand
        torch.testing.assert_close(out, weight * _plain_mask(logits, index, sample).detach())
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()


_FIRST_MATH_CALL = """
import torch
from megatron.sparse.compat import warm_up_cpu_math
warm_up_cpu_math()
x = torch.rand(528, 6) * 10 + 0.1
err = float(((torch.log(x) - x.double().log()) / x.double().log()).abs().max())
print("ok" if err < 1e-6 else "bad")
"""


def test_first_cpu_math_call_of_a_process_is_accurate_after_the_warm_up():
    """torch 2.13's first vectorised CPU math call of a process is sometimes off by ~1e-4
    (compat.warm_up_cpu_math; without the warm-up 1 to 4 of 16 fresh processes here see it); with
    it, fresh processes compute the first call exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_MATH_CALL], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate()[0].strip() for p in procs]
    assert results == ["ok"] * 8, results
