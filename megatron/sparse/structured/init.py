"""Initial keep-probabilities: uniform, or from the structured Wanda-sp metric.

Wanda-sp scores an input column ``j`` of the output projection and of ``linear_fc2`` by
``mean_i |W_ij| * ||X_j||`` (``X``: that linear's calibration input); a KV group's score is the
mean over its query heads of the head's summed column scores, a channel's is its column score.
As in the references the calibration activations go through the layers one after another, each
layer's input having passed the earlier layers with their *initial* masks applied (per layer the
top ``f`` fraction of units by score; ``f`` the pool's keep fraction). Per layer and module the
scores become probabilities by z-score, sigmoid, a shift to mean ``f`` and a clamp to [0, 1]
(the public code's ``sigmap``); the pools are then projected onto their budgets.

Under tensor parallelism each rank scores its shard (the row-parallel inputs are local, so the
column scores are exact) and the scores are all-gathered over the TP group.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.sparse.model import LlamaArgs, causal_attention_mask
from megatron.sparse.parallel import gather_last_dim
from megatron.sparse.prune.attention import fused_causal_attention
from megatron.sparse.prune.calibration import InputStats, _tp
from megatron.sparse.structured.masking import UnitMasker
from megatron.sparse.structured.policy import Budget, KeepProbs

INITS = ("wanda-sp", "uniform")


def check_init(name: str) -> None:
    if name not in INITS:
        raise ValueError(f"unknown --init {name!r}; choose one of {', '.join(INITS)}")


def sigmap(scores: torch.Tensor, mean: float) -> torch.Tensor:
    """z-score, sigmoid, shift to ``mean``, clamp to [0, 1] (one layer's one module)."""
    std = scores.std() if scores.numel() > 1 else torch.zeros(())
    p = torch.sigmoid((scores - scores.mean()) / (std + 1e-8))
    return (p + (mean - p.mean())).clamp(0, 1)


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool: ``scores >= `` the ``int((1 - fraction) n)``-th smallest (the references' rule)."""
    cut = torch.sort(scores).values[min(int((1 - fraction) * scores.numel()), scores.numel() - 1)]
    return scores >= cut


def column_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """``mean_i |W_ij| * ||X_j||`` per input column of a (local) weight ``[out, in]``."""
    norms = stats.sq_sum.float().sqrt().to(weight.device)
    return (weight.detach().float().abs() * norms[None, :]).mean(dim=0)


@torch.no_grad()
def wanda_sp_probs(model: torch.nn.Module, args: LlamaArgs, tokens: torch.Tensor,
                   budget: Budget, *, micro_batch_size: int = 4,
                   log: Callable[[str], None] | None = None) -> KeepProbs:
    """Keep-probabilities from Wanda-sp scores on ``[n, L]`` calibration tokens."""
    log = log or (lambda msg: None)
    tp, _, group = _tp()
    frac = budget.pool_fractions(args)
    probs = KeepProbs.uniform(args, budget)
    init_groups = torch.ones_like(probs.kv_groups, dtype=torch.bool)
    init_channels = torch.ones_like(probs.channels, dtype=torch.bool)
    ones = torch.ones(args.num_layers, dtype=torch.bool)
    masker = UnitMasker(model, args)
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    seq = tokens.shape[1]
    attn_mask = causal_attention_mask(seq, device)
    rope = model.rotary_pos_emb(seq)
    hidden = []
    for start in range(0, tokens.shape[0], micro_batch_size):
        batch = tokens[start:start + micro_batch_size]
        pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch.shape[0], -1)
        hidden.append(model.embedding(input_ids=batch, position_ids=pos))
    heads_per_group = args.num_attention_heads // args.num_key_value_heads
    try:
        for index, layer in enumerate(model.decoder.layers):
            masker.set(None)
            proj, fc2 = layer.self_attention.linear_proj, layer.mlp.linear_fc2
            stats = {"proj": InputStats(wanda=True, hessian=False),
                     "fc2": InputStats(wanda=True, hessian=False)}
            handles = [proj.register_forward_pre_hook(stats["proj"].hook),
                       fc2.register_forward_pre_hook(stats["fc2"].hook)]
            try:
                with fused_causal_attention([layer]):
                    for h in hidden:
                        layer(h, attention_mask=attn_mask, rotary_pos_emb=rope)
            finally:
                for handle in handles:
                    handle.remove()
            col = column_scores(proj.weight, stats["proj"])
            head = col.reshape(-1, args.kv_channels).sum(dim=1)
            group_scores = head.reshape(-1, heads_per_group).mean(dim=1)
            chan_scores = column_scores(fc2.weight, stats["fc2"])
            group_scores = gather_last_dim(group_scores[None], tp, group)[0].cpu()
            chan_scores = gather_last_dim(chan_scores[None], tp, group)[0].cpu()
            if "heads" in budget.units:
                probs.kv_groups[index] = sigmap(group_scores, frac["kv_groups"])
                init_groups[index] = top_fraction(group_scores, frac["kv_groups"])
            if "channels" in budget.units:
                probs.channels[index] = sigmap(chan_scores, frac["channels"])
                init_channels[index] = top_fraction(chan_scores, frac["channels"])
            if index + 1 < len(model.decoder.layers):
                masker.set_scales(kv_groups=init_groups, channels=init_channels,
                                  attention=ones, mlp=ones)
                with fused_causal_attention([layer]):
                    for i, h in enumerate(hidden):
                        hidden[i] = layer(h, attention_mask=attn_mask, rotary_pos_emb=rope)[0]
            log(f"wanda-sp init: layer {index + 1}/{len(model.decoder.layers)}")
    finally:
        masker.remove()
    probs.project(args, budget)
    return probs

