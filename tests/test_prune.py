"""One-shot 2:4 pruning against plain single-process references written here (not product code)."""

import numpy as np
import pytest
import torch

from megatron.sparse import parallel
from megatron.sparse.convert.sharding import merge_state_dicts, shard_state_dict
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import model_forward
from megatron.sparse.prune.apply import store_mask
from megatron.sparse.prune.calibration import InputStats, prune_model
from megatron.sparse.prune.magnitude import magnitude_mask
from megatron.sparse.prune.sparsegpt import sparsegpt_prune
from megatron.sparse.prune.wanda import wanda_mask
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa


# -- independent references ----------------------------------------------------------------------
def ref_keep_two(scores: np.ndarray) -> np.ndarray:
    """Per group of 4 columns keep the 2 highest scores (ties: lower index), plain loops."""
    rows, cols = scores.shape
    keep = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for g in range(0, cols, 4):
            ranked = sorted(range(4), key=lambda k: (-scores[r, g + k], k))
            for k in ranked[:2]:
                keep[r, g + k] = True
    return keep


def ref_wanda(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    norms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=0))
    return ref_keep_two(np.abs(weight.astype(np.float64)) * norms[None, :])


def ref_sparsegpt(weight: np.ndarray, x: np.ndarray, percdamp: float = 0.01):
    """Column-by-column OBS (no lazy blocks) in float64, straight from the paper's algorithm."""
    W = weight.astype(np.float64).copy()
    n, cols = x.shape
    H = 2.0 / n * (x.astype(np.float64).T @ x.astype(np.float64))
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor: Hinv = U^T U
    keep = np.ones_like(W, dtype=bool)
    for j in range(cols):
        if j % 4 == 0:
            sal = W[:, j:j + 4] ** 2 / np.diag(U)[j:j + 4][None, :] ** 2
            for r in range(W.shape[0]):
                ranked = sorted(range(4), key=lambda k: (sal[r, k], k))
                for k in ranked[:2]:
                    keep[r, j + k] = False
        q = np.where(keep[:, j], W[:, j], 0.0)
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
        W[:, j] = q
    return keep, W


# -- pure functions ------------------------------------------------------------------------------
def _two_four(mask: torch.Tensor) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def test_magnitude_matches_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g)
    mask = magnitude_mask(weight=w)
    assert mask.dtype == torch.bool and _two_four(mask)
    np.testing.assert_array_equal(mask.numpy(), ref_keep_two(np.abs(w.numpy())))
    # a hand-made case: ties and negatives
    w2 = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    assert magnitude_mask(weight=w2).tolist() == [[False, True, True, False,
                                                   True, True, False, False]]


def test_wanda_matches_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(300, 64, generator=g) * torch.rand(64, generator=g) * 3
    mask = wanda_mask(weight=w, input_sq_sum=(x.double() ** 2).sum(0), num_tokens=300)
    assert _two_four(mask)
    np.testing.assert_array_equal(mask.numpy(), ref_wanda(w.numpy(), x.numpy()))
    # Wanda differs from magnitude when the input norms are uneven
    assert not torch.equal(mask, magnitude_mask(weight=w))


@pytest.mark.parametrize("block_size", [128, 8])
def test_sparsegpt_matches_reference(block_size):
    g = torch.Generator().manual_seed(2)
    rows, cols, n = 24, 256, 1024
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols,
                                                                                  generator=g))
    x[:, 5] = 0  # a dead input
    h = 2.0 / n * (x.t() @ x)
    ref_keep, ref_w = ref_sparsegpt(w.numpy(), x.numpy())
    mask, new = sparsegpt_prune(weight=w, hessian=h, update_weight=True, block_size=block_size)
    assert _two_four(mask)
    np.testing.assert_array_equal(mask.numpy(), ref_keep)
    np.testing.assert_allclose(new.numpy(), ref_w, rtol=1e-3, atol=2e-4)
    assert (new[~mask] == 0).all()
    # float64 in, float64 computation: near-exact
    x64 = x.double()
    mask64, new64 = sparsegpt_prune(weight=w.double(), hessian=2.0 / n * (x64.t() @ x64),
                                    update_weight=True,
                                    block_size=block_size)
    np.testing.assert_array_equal(mask64.numpy(), ref_keep)
    np.testing.assert_allclose(new64.numpy(), ref_w, rtol=1e-7, atol=1e-8)
    # mask-only: same mask, no weights
    mask_only, none = sparsegpt_prune(weight=w, hessian=h, block_size=block_size)
    assert none is None and torch.equal(mask_only, mask)
    # and the mask is not simply the magnitude mask
    assert not torch.equal(mask, magnitude_mask(weight=w))


@pytest.mark.parametrize("width", [7, 256, 300, 1536])
def test_hessian_from_blocked_gram_equals_float64_reference(width):
    """The upper-block-row accumulation gives the full symmetric ``2/n sum x x^T``: against a
    float64 product over several batches, widths below, at and across the block size."""
    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(b, 3, width, generator=gen) for b in (5, 1, 9)]
    stats = InputStats(wanda=False, hessian=True)
    for x in batches:
        stats.add(x)
    x64 = torch.cat([x.reshape(-1, width) for x in batches]).double()
    ref = 2.0 / x64.shape[0] * x64.t() @ x64
    got = stats.hessian_matrix()
    assert stats.num_tokens == x64.shape[0] and torch.equal(got, got.t())
    # fp32 sums of n = 45 products: |err H_ij| <= (2/n) n u sum_t |x_ti x_tj| = 2 n u mean|x x|,
    # and mean|x_ti x_tj| < 4 for unit normals
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=45 * 2**-24 * 2 * 4)


def test_store_mask_keeps_the_exact_mask_as_uint8_choices():
    cand = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1],
                         [0, 0, 1, 1]], dtype=torch.bool)
    with parallel.distributed(1, seed=5):
        model = tiny_gqa().build(mask_kind="logits")
        name, layer = sparse_layers(model)[0]
        mask = magnitude_mask(weight=layer.weight.detach())
        store_mask(layer, mask)
        assert layer.mask_kind == "fixed" and "mask_logits" not in layer.state_dict()
        rows, cols = layer.weight.shape
        assert layer.mask_choice.dtype == torch.uint8
        assert tuple(layer.mask_choice.shape) == (rows, cols // 4)
        assert torch.equal(cand[layer.mask_choice.long()].reshape(rows, cols), mask)
        assert torch.equal(layer.eval_mask(), mask)
        x = torch.randn(3, 1, cols, generator=torch.Generator().manual_seed(1))
        out, _ = layer.eval()(x)
        torch.testing.assert_close(out, x @ (layer.weight * mask).t(), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="not 2:4"):
            store_mask(layer, torch.ones_like(mask))


def test_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by 4"):
        magnitude_mask(weight=torch.randn(3, 6))
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        wanda_mask(weight=torch.randn(3, 8), input_sq_sum=torch.ones(4), num_tokens=3)
    with pytest.raises(ValueError, match="Hessian has shape"):
        sparsegpt_prune(weight=torch.randn(3, 8), hessian=torch.eye(4))


# -- the sequential driver on a tiny megatron model -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    with parallel.distributed(1, seed=5):
        model = tiny_gqa().build()
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
    tokens = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    return state, tokens


def _prune_and_gather(state, tokens, method, update):
    """On each rank: load the shard, prune, gather masks/weights/loss (runs under run_distributed)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = tiny_gqa().build()
    model.load_state_dict(shard_state_dict(state, tp)[rank])
    before = {n: l.weight.detach().clone() for n, l in sparse_layers(model)}
    masks = prune_model(model, tokens, method=method, update_weight=update, micro_batch_size=4)
    local = {}
    for name, layer in sparse_layers(model):
        assert torch.equal(layer.eval_mask(), masks[name])
        local[f"{name}.weight"] = layer.eval_mask().float()
        local[f"{name}.weight.before"] = before[name]
        local[f"{name}.weight.after"] = layer.weight.detach().clone()
    shards = [None] * tp
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    merged = {}
    for key in local:
        base = key.replace(".before", "").replace(".after", "")
        pieces = [s[key] for s in shards]
        from megatron.sparse.convert.sharding import merge_tensor
        merged[key] = merge_tensor(base, pieces)
    loss = float(model_forward(model, tokens[:, :-1], tokens[:, 1:]).mean())
    return {"tensors": merged, "loss": loss}


@pytest.mark.parametrize("method,update", [("magnitude", False), ("wanda", False),
                                           ("sparsegpt", False), ("sparsegpt", True)])
def test_prune_model_tp1_tp2(tiny_state, method, update):
    state, tokens = tiny_state
    ref = run_distributed(_prune_and_gather, 1, state, tokens, method, update)
    got = run_distributed(_prune_and_gather, 2, state, tokens, method, update)
    masks = {k: v for k, v in ref["tensors"].items() if k.endswith(".weight")}
    assert len(masks) == 8
    for key, mask in masks.items():
        assert _two_four(mask.bool()), key
        assert torch.equal(got["tensors"][key], mask), f"TP=2 mask differs: {key}"
        before, after = ref["tensors"][key + ".before"], ref["tensors"][key + ".after"]
        if update:
            assert (after[~mask.bool()] == 0).all()
            assert not torch.equal(after, before)
            torch.testing.assert_close(got["tensors"][key + ".after"], after, rtol=1e-4,
                                       atol=1e-5)
        else:
            assert torch.equal(after, before), f"weights changed without --update-weight: {key}"
    assert abs(got["loss"] - ref["loss"]) < 1e-4


def test_prune_model_first_layer_matches_reference(tiny_state):
    """Layer 0's masks equal the references fed with the inputs captured from the dense layer."""
    state, tokens = tiny_state
    with parallel.distributed(1, seed=5):
        model = tiny_gqa().build()
        model.load_state_dict(state)
        set_mask_state(model, enabled=False)
        layer = model.decoder.layers[0]
        captured = {}
        hooks = [lin.register_forward_pre_hook(
            lambda m, a, n=name: captured.setdefault(n, []).append(a[0].detach().clone()))
            for name, lin in sparse_layers(layer)]
        model_forward(model, tokens)
        for h in hooks:
            h.remove()
        weights = {n: lin.weight.detach().clone() for n, lin in sparse_layers(layer)}
        wanda_masks = prune_model(model, tokens, method="wanda", micro_batch_size=6)
        model = tiny_gqa().build()  # pruning made its layers fixed-mask ones
        model.load_state_dict(state)
        gpt_masks = prune_model(model, tokens, method="sparsegpt", micro_batch_size=6)
    for name, w in weights.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]]).double().numpy()
        np.testing.assert_array_equal(wanda_masks[f"decoder.layers.0.{name}"].numpy(),
                                      ref_wanda(w.numpy(), x), err_msg=name)
        keep, _ = ref_sparsegpt(w.numpy(), x)
        np.testing.assert_array_equal(gpt_masks[f"decoder.layers.0.{name}"].numpy(), keep,
                                      err_msg=name)


def test_unknown_method_and_update_without_sparsegpt(tiny_state):
    state, tokens = tiny_state
    with parallel.distributed(1, seed=5):
        model = tiny_gqa().build()
        with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
            prune_model(model, tokens, method="obs")
        with pytest.raises(ValueError, match="only applies to sparsegpt"):
            prune_model(model, tokens, method="wanda", update_weight=True)


@pytest.mark.parametrize("kv_heads", [8, 4, 2])
def test_fused_calibration_attention_matches_megatron_layer(kv_heads):
    """A decoder layer with the SDPA core attention swapped in gives the megatron layer's output
    (fp32 reassociation only: well under 1e-5 of the output scale), and the swap is undone."""
    from megatron.sparse.model import causal_attention_mask
    from megatron.sparse.prune.attention import fused_causal_attention

    gen = torch.Generator().manual_seed(kv_heads)
    with parallel.distributed(1, seed=5):
        model = tiny_gqa(num_key_value_heads=kv_heads).build()
        model.eval()
        layer = model.decoder.layers[0]
        original = layer.self_attention.core_attention
        seq = 24
        h = torch.randn(seq, 3, 64, generator=gen)
        kwargs = dict(attention_mask=causal_attention_mask(seq),
                      rotary_pos_emb=model.rotary_pos_emb(seq))
        with torch.no_grad():
            ref = layer(h, **kwargs)[0]
            with fused_causal_attention([layer]) as swapped:
                got = layer(h, **kwargs)[0]
    assert swapped == 1
    assert layer.self_attention.core_attention is original
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
