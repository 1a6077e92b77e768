"""TP=1, 2, 4 on gloo give the unsharded forward, input gradient and mask-logit gradients.

With Gumbel noise on, this also checks that every shard (fc1's [gate_r; up_r] rows included)
draws the unsharded layer's noise.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse.convert.sharding import merge_state_dicts, shard_state_dict
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import causal_attention_mask
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa


def _gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _forward_backward(full_state, hidden, tokens, hard, noise):
    """On each rank: load the shard, soft-mask forward with labels, backward; gather results."""
    args = tiny_gqa()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = args.build()
    model.load_state_dict(shard_state_dict(full_state, tp)[rank])
    set_mask_state(model, tau=0.5, kappa=3.0, hard=hard, noise=noise, noise_seed=2024)
    model.train()
    x = hidden.clone().requires_grad_(True)
    seq, batch = tokens.shape[1], tokens.shape[0]
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    logits = model(None, pos, causal_attention_mask(seq), decoder_input=x)
    # A loss over the full vocab, written per vocab shard: the shards' terms add up to it.
    vocab = logits.shape[-1] * tp
    weights = torch.linspace(-1, 1, vocab).chunk(tp)[rank]
    loss = (logits.float() ** 2).sum() / (logits.numel() * tp) + (logits * weights).sum()
    loss.backward()
    grads = {f"{name}.mask_logits": layer.mask_logits.grad.clone()
             for name, layer in sparse_layers(model)}
    shards = [None] * tp
    dist.all_gather_object(shards, grads, group=parallel_state.get_tensor_model_parallel_group())
    return {"logits": _gather_tp(logits.detach(), -1), "input_grad": x.grad.clone(),
            "mask_grads": merge_state_dicts(shards)}


@pytest.fixture(scope="module")
def reference_inputs():
    torch.manual_seed(0)
    args = tiny_gqa()
    from megatron.sparse import parallel

    with parallel.distributed(1, seed=3):
        model = args.build()
        for _, layer in sparse_layers(model):  # spread logits so masks are far from uniform
            torch.nn.init.normal_(layer.mask_logits, std=0.5)
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
    hidden = torch.randn(12, 2, args.hidden_size)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    return state, hidden, tokens


@pytest.mark.parametrize("hard,noise", [(False, True), (True, True)])
def test_tp_matches_unsharded(reference_inputs, hard, noise):
    state, hidden, tokens = reference_inputs
    ref = run_distributed(_forward_backward, 1, state, hidden, tokens, hard, noise)
    assert ref["input_grad"].abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in ref["mask_grads"].values())
    for tp in (2, 4):
        got = run_distributed(_forward_backward, tp, state, hidden, tokens, hard, noise)
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["input_grad"], ref["input_grad"], rtol=1e-5, atol=1e-6)
        assert got["mask_grads"].keys() == ref["mask_grads"].keys()
        for key in ref["mask_grads"]:
            torch.testing.assert_close(got["mask_grads"][key], ref["mask_grads"][key],
                                       rtol=1e-4, atol=1e-6, msg=f"TP={tp} {key}")
