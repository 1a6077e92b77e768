"""Sparse layers against megatron's dense layers and plain F.linear (TP=1, in-process)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron.sparse import mask as M
from megatron.sparse import parallel
from megatron.sparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear
from tests.tiny import tiny_gqa


@pytest.fixture(scope="module")
def config():
    with parallel.distributed(1, seed=5):
        yield tiny_gqa().transformer_config(tp_size=1, params_dtype=torch.float32)


def _pair(config, sparse_cls, dense_cls, **kw):
    init = torch.nn.init.normal_
    sparse = sparse_cls(32, 48, config=config, init_method=init, bias=False, **kw)
    dense = dense_cls(32, 48, config=config, init_method=init, bias=False, **kw)
    with torch.no_grad():
        dense.weight.copy_(sparse.weight)
    return sparse, dense


@pytest.mark.parametrize("kind", ["column", "row"])
def test_disabled_mask_equals_dense_megatron_layer(config, kind):
    if kind == "column":
        sparse, dense = _pair(config, SparseColumnParallelLinear, ColumnParallelLinear)
    else:
        sparse, dense = _pair(config, SparseRowParallelLinear, RowParallelLinear,
                              input_is_parallel=True, skip_bias_add=False)
    sparse.mask_state.enabled = False
    x = torch.randn(6, 2, 32)
    for mode in ("train", "eval"):
        getattr(sparse, mode)(), getattr(dense, mode)()
        assert torch.equal(sparse(x)[0], dense(x)[0])


@pytest.mark.parametrize("cls", [SparseColumnParallelLinear, SparseRowParallelLinear])
def test_fixed_two_four_mask_equals_masked_f_linear(config, cls):
    extra = {} if cls is SparseColumnParallelLinear else dict(input_is_parallel=True,
                                                             skip_bias_add=False)
    layer = cls(32, 48, config=config, init_method=torch.nn.init.normal_, bias=False, **extra)
    fixed = M.candidate_matrix(torch.bool)[torch.randint(0, 6, (48, 8))]
    layer.set_mask_prior(M.groups_to_weight(fixed), strength=20.0)
    layer.eval()
    assert torch.equal(layer.eval_mask(), M.groups_to_weight(fixed))
    x = torch.randn(5, 3, 32)
    expected = F.linear(x, layer.weight * M.groups_to_weight(fixed))
    torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=0)


def test_soft_mask_forward_and_logit_gradient_match_plain_pytorch(config):
    layer = SparseColumnParallelLinear(32, 48, config=config, init_method=torch.nn.init.normal_,
                                       bias=False)
    layer.mask_state.noise = False
    layer.mask_state.tau, layer.mask_state.kappa = 0.5, 2.0
    layer.train()
    x = torch.randn(4, 2, 32)
    out = layer(x)[0]
    out.pow(2).sum().backward()
    logits = layer.mask_logits.detach().clone().requires_grad_(True)
    probs = torch.softmax(2.0 * logits / 0.5, -1)
    ref = F.linear(x, layer.weight.detach() * (probs @ M.candidate_matrix()).reshape(48, 32))
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(layer.mask_logits.grad, logits.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None  # frozen by default


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_loss_plus_regulariser_gradient_matches_plain_pytorch(config, kernel, monkeypatch):
    """One backward of loss - lambda * ||sg(W) M||^2 through the layer (the trainer's objective),
    on the fused kernel path (regulariser from the forward pass) and the PyTorch path."""
    from megatron.sparse import cpu_kernels

    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, kernel)
    cpu_kernels.load.cache_clear()
    try:
        layer = SparseColumnParallelLinear(32, 48, config=config,
                                           init_method=torch.nn.init.normal_, bias=False)
        layer.mask_state.noise = False
        layer.mask_state.tau, layer.mask_state.kappa = 0.5, 2.0
        layer.train()
        x = torch.randn(4, 2, 32)
        out = layer(x)[0]
        reg = layer.sparse_weight_norm_sq()
        (out.pow(2).sum() - 0.1 * reg).backward()
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()
    logits = layer.mask_logits.detach().clone().requires_grad_(True)
    mask = (torch.softmax(2.0 * logits / 0.5, -1) @ M.candidate_matrix()).reshape(48, 32)
    weight = layer.weight.detach()
    ref_reg = (weight * mask).pow(2).sum()
    (F.linear(x, weight * mask).pow(2).sum() - 0.1 * ref_reg).backward()
    torch.testing.assert_close(reg.detach(), ref_reg.detach())
    torch.testing.assert_close(layer.mask_logits.grad, logits.grad, rtol=1e-5, atol=1e-5)


def test_eval_mask_cached_until_logits_change(config):
    layer = SparseColumnParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_,
                                       bias=False)
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
    col = SparseColumnParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_,
                                     bias=False)
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
