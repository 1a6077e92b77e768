"""Sparse layers against megatron's dense layers and plain F.linear (TP=1, in-process)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron.sparse import mask as M
from megatron.sparse import parallel, sampling
from megatron.sparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear
from tests import kernel_reference as R
from tests.tiny import tiny_gqa


@pytest.fixture(scope="module")
def config():
    with parallel.distributed(1, seed=5):
        yield tiny_gqa().transformer_config(tp_size=1, params_dtype=torch.float32)


def _pair(config, sparse_cls, dense_cls, gen, **kw):
    init = torch.nn.init.normal_
    sparse = sparse_cls(32, 48, config=config, init_method=init, bias=False, **kw)
    dense = dense_cls(32, 48, config=config, init_method=init, bias=False, **kw)
    with torch.no_grad():
        sparse.weight.copy_(torch.randn(sparse.weight.shape, generator=gen))
        dense.weight.copy_(sparse.weight)
    return sparse, dense


@pytest.mark.parametrize("kind", ["column", "row"])
def test_disabled_mask_equals_dense_megatron_layer(config, kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "column":
        sparse, dense = _pair(config, SparseColumnParallelLinear, ColumnParallelLinear, gen)
    else:
        sparse, dense = _pair(config, SparseRowParallelLinear, RowParallelLinear, gen,
                              input_is_parallel=True, skip_bias_add=False)
    sparse.mask_state.enabled = False
    x = torch.randn(6, 2, 32, generator=gen)
    for mode in ("train", "eval"):
        getattr(sparse, mode)(), getattr(dense, mode)()
        assert torch.equal(sparse(x)[0], dense(x)[0])


@pytest.mark.parametrize("cls", [SparseColumnParallelLinear, SparseRowParallelLinear])
def test_fixed_two_four_mask_equals_masked_f_linear(config, cls):
    gen = torch.Generator().manual_seed(2)
    extra = {} if cls is SparseColumnParallelLinear else dict(input_is_parallel=True,
                                                             skip_bias_add=False)
    layer = cls(32, 48, config=config, init_method=torch.nn.init.normal_, bias=False, **extra)
    fixed = M.candidate_matrix(torch.bool)[torch.randint(0, 6, (48, 8), generator=gen)]
    layer.set_mask_prior(M.groups_to_weight(fixed), strength=20.0)
    layer.eval()
    assert torch.equal(layer.eval_mask(), M.groups_to_weight(fixed))
    x = torch.randn(5, 3, 32, generator=gen)
    expected = F.linear(x, layer.weight * M.groups_to_weight(fixed))
    torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=0)


TAU, KAPPA = 0.5, 2.0


def _soft_layer(config):
    layer = SparseColumnParallelLinear(32, 48, config=config, init_method=torch.nn.init.normal_,
                                       bias=False)
    layer.mask_state.noise = False
    layer.mask_state.tau, layer.mask_state.kappa = TAU, KAPPA
    layer.train()
    return layer


def _seed_layer(layer, seed):
    """Weights, logits (at one of three scales) and input from the seed's own generator."""
    gen = torch.Generator().manual_seed(seed)
    std = (M.LOGITS_INIT_STD, 0.5, 2.0)[seed % 3]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.mask_logits.copy_(torch.randn(layer.mask_logits.shape, generator=gen) * std)
    layer.mask_logits.grad = None
    return torch.randn(4, 2, 32, generator=gen)


def _float64_objective(layer, x, lam, kappa=KAPPA):
    """``||F.linear(x, W M)||^2 - lam ||sg(W) M||^2`` in float64 by autograd, with
    ``M = softmax(kappa l / tau) @ S``; returns (out, reg, logits grad) and the float32 error
    bounds of each (see the caller's docstring)."""
    weight, logits = layer.weight.detach(), layer.mask_logits.detach()
    l64 = logits.double().requires_grad_(True)
    mask = M.groups_to_weight(torch.softmax(kappa / TAU * l64, -1) @ M.candidate_matrix(
        torch.float64))
    w64, x64 = weight.double(), x.double()
    out = F.linear(x64, w64 * mask)
    reg = (w64 * mask).pow(2).sum()
    (out.pow(2).sum() - lam * reg).backward()

    sample = sampling.MaskSample(seed=0, tau=TAU, kappa=kappa, noise=False)
    index = sampling.NoiseIndex.contiguous(*logits.shape[:2])
    base = R.reference(weight, logits, index, sample, grad_out=torch.zeros_like(weight),
                       with_weight_grad=False)
    xs, outs = x64.reshape(-1, 32), out.detach().reshape(-1, 48)
    tokens, fan_in = xs.shape
    xa, wm = xs.abs(), (w64 * mask).detach().abs()
    tol_out = xa @ base.tol_out.t() + fan_in * R.U * (xa @ wm.t())
    grad_w = 2 * outs.t() @ xs
    err_grad_w = 2 * tol_out.t() @ xa + 2 * tokens * R.U * (xa @ wm.t()).t() @ xa
    full = R.reference(weight, logits, index, sample, grad_out=grad_w, reg_scale=-2 * lam,
                       grad_out_err=err_grad_w, with_weight_grad=False)
    torch.testing.assert_close(full.grad_logits, l64.grad, rtol=1e-9, atol=1e-9)
    return (out.detach(), tol_out.reshape(out.shape)), (reg.detach(), full.tol_sq_norm), \
        (l64.grad, full.tol_grad_logits)


def test_soft_mask_forward_and_logit_gradient_match_float64_reference(config):
    """Output and logit gradient of ``||layer(x)||^2`` within their float32 bounds of float64.

    Bounds (``u = 2^-24``; tests/kernel_reference.py bounds the mask ``W M`` itself, ``t_WM``):
    ``out = x (W M)^T`` over ``K = 32`` inputs is off by ``<= |x| t_WM^T + K u |x| |W M|^T``
    (``t_out``); the weight gradient ``2 out^T x`` over ``N = 8`` tokens by ``<= 2 t_out^T |x|
    + 2 N u |out|^T |x|``, which enters the mask kernel's logit-gradient bound as the error of
    its ``grad_out``. Every seed (``MEGATRON_SPARSE_KERNEL_STRESS``) draws its own inputs."""
    layer = _soft_layer(config)
    for seed in R.stress_seeds(3):
        x = _seed_layer(layer, seed)
        out = layer(x)[0]
        out.pow(2).sum().backward()
        (ref_out, tol_out), _, (ref_grad, tol_grad) = _float64_objective(layer, x, 0.0)
        R.assert_within(f"seed {seed} out", out.detach(), ref_out, tol_out)
        R.assert_within(f"seed {seed} grad", layer.mask_logits.grad, ref_grad, tol_grad)
    assert layer.weight.grad is None  # frozen by default


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_loss_plus_regulariser_gradient_matches_float64_reference(config, kernel, monkeypatch):
    """One backward of loss - lambda * ||sg(W) M||^2 through the layer (the trainer's objective),
    on the fused kernel path (regulariser from the forward pass) and the PyTorch path, within
    the float32 bounds of the previous test's analysis (the regulariser adds ``2 lambda W^2 M``
    to the kernel's ``q``)."""
    from megatron.sparse import cpu_kernels

    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, kernel)
    cpu_kernels.load.cache_clear()
    try:
        layer = _soft_layer(config)
        for seed in R.stress_seeds(3):
            x = _seed_layer(layer, seed)
            out = layer(x)[0]
            reg = layer.sparse_weight_norm_sq()
            (out.pow(2).sum() - 0.1 * reg).backward()
            _, (ref_reg, tol_reg), (ref_grad, tol_grad) = _float64_objective(layer, x, 0.1)
            R.assert_within(f"seed {seed} reg", reg.detach(), ref_reg, torch.tensor(tol_reg))
            R.assert_within(f"seed {seed} grad", layer.mask_logits.grad, ref_grad, tol_grad)
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()


def test_layer_bounds_catch_a_slightly_wrong_mask(config):
    """The bounds can fail: a reference whose kappa is 0.1 % off is outside them."""
    layer = _soft_layer(config)
    x = _seed_layer(layer, 1)
    out = layer(x)[0]
    out.pow(2).sum().backward()
    _, _, (ref_grad, tol_grad) = _float64_objective(layer, x, 0.0, kappa=KAPPA * 1.001)
    assert R.excess(layer.mask_logits.grad, ref_grad, tol_grad) > 1


def test_eval_mask_cached_until_logits_change(config):
    with torch.random.fork_rng():  # the layer initialises from torch's generator: seed it here
        torch.manual_seed(3)
        layer = SparseColumnParallelLinear(32, 16, config=config,
                                           init_method=torch.nn.init.normal_, bias=False)
    first = layer.eval_mask()
    assert layer.eval_mask() is first
    with torch.no_grad():
        layer.mask_logits.mul_(-1)
    second = layer.eval_mask()
    assert second is not first and not torch.equal(second, first)
    assert torch.equal(second, M.groups_to_weight(M.hard_mask(layer.mask_logits)))


def test_weights_trainable_flag(config):
    layer = SparseColumnParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_,
                                       bias=False, trainable_weights=True)
    assert layer.weight.requires_grad and layer.mask_logits.requires_grad


def test_logits_layout_and_tp_attributes(config):
    with torch.random.fork_rng():
        torch.manual_seed(4)
        col = SparseColumnParallelLinear(32, 16, config=config,
                                         init_method=torch.nn.init.normal_, bias=False)
    row = SparseRowParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_,
                                  bias=False, input_is_parallel=True, skip_bias_add=False)
    assert col.mask_logits.shape == (16, 8, 6) and col.mask_logits.dtype == torch.float32
    assert col.mask_logits.partition_dim == 0 and row.mask_logits.partition_dim == 1
    assert col.mask_logits.tensor_model_parallel and row.mask_logits.tensor_model_parallel
    assert abs(col.mask_logits.std().item() - M.LOGITS_INIT_STD) < 0.003


@pytest.mark.parametrize("cls", [SparseColumnParallelLinear, SparseRowParallelLinear])
def test_input_not_divisible_by_four_fails_before_allocation(config, cls):
    extra = {} if cls is SparseColumnParallelLinear else dict(input_is_parallel=True,
                                                             skip_bias_add=False)
    with pytest.raises(ValueError, match="not divisible by 4"):
        cls(30, 16, config=config, init_method=torch.nn.init.normal_, bias=False, **extra)


@pytest.mark.parametrize("field,value,what", [
    ("num_attention_heads", 6, "attention heads"),
    ("num_key_value_heads", 3, "KV heads"),
    ("intermediate_size", 132, "FFN size"),
])
def test_tp_size_that_does_not_divide_model_is_an_error(field, value, what):
    overrides = {field: value}
    if field == "num_attention_heads":
        overrides["num_key_value_heads"] = 2
    if field == "num_key_value_heads":
        overrides["num_attention_heads"] = 12
    with pytest.raises(ValueError, match=what):
        tiny_gqa(**overrides).validate(4)


def test_row_parallel_input_per_rank_not_divisible_by_four():
    # 8 heads x 6 = 48 attention outputs; at TP=8 each rank holds 6 columns -> not 2:4-groupable
    with pytest.raises(ValueError, match="not divisible by 4"):
        tiny_gqa(head_dim=6, num_key_value_heads=8, intermediate_size=256).validate(8)
