"""Calibration statistics and the sequential, layer-by-layer one-shot pruning driver.

The driver follows the reference implementations of SparseGPT and Wanda: the calibration tokens
are embedded once; then, for each decoder layer in turn, the layer runs on the cached hidden
states (which already went through the pruned earlier layers, with updated weights when
``update_weight``) while forward pre-hooks on its four sparse linears (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2``) accumulate their input statistics. All four are
collected in that one dense pass of the layer and pruned together (the references' default; not
the "true sequential" variant that re-runs the layer after pruning each linear). The layer then
runs again with its pruned weights to produce the inputs of the next layer. The collecting pass
stops once the last linear has its input (its output is never used), and both passes run the
causal attention through the fused SDPA kernel (:mod:`megatron.sparse.prune.attention`).

Under tensor parallelism each rank prunes its own shard with local statistics. Column-parallel
linears see the full input, so their statistics are the same on every rank. Row-parallel linears
see the input slice that matches their weight columns: Wanda's per-column norms are exactly
local. SparseGPT's Hessian couples all input columns, so by default (``full_row_hessian``) the
row-parallel inputs are all-gathered over the TP group, the full Hessian and the full weight
rows are formed, and every rank takes its column slice of the result; this makes the masks
independent of the TP size. ``full_row_hessian=False`` uses the local (block-diagonal) Hessian
instead, which needs no communication.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron.sparse.heap import trim_heap
from megatron.sparse.layers import SparseRowParallelLinear, set_mask_state, sparse_layers
from megatron.sparse.model import causal_attention_mask
from megatron.sparse.parallel import gather_last_dim
from megatron.sparse.prune.apply import store_mask
from megatron.sparse.prune.attention import fused_causal_attention
from megatron.sparse.prune.magnitude import magnitude_mask
from megatron.sparse.prune.sparsegpt import sparsegpt_prune
from megatron.sparse.prune.wanda import wanda_mask

METHODS = ("magnitude", "wanda", "sparsegpt")


def check_method(method: str, update_weight: bool = False) -> None:
    """One-line ValueError for an unknown method or ``update_weight`` without SparseGPT."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if update_weight and method != "sparsegpt":
        raise ValueError(f"--update-weight only applies to sparsegpt, not to {method}")


def _tp() -> tuple[int, int, object]:
    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_group())
    return 1, 0, None


GRAM_BLOCK = 256


def add_upper_gram(acc: torch.Tensor, x: torch.Tensor, *, block: int = GRAM_BLOCK) -> None:
    """``acc += x^T x`` on the block rows' upper part only (a blocked SYRK).

    Row block ``i`` gets ``x[:, i]^T x[:, i:]``: for a 1536-wide input in blocks of 256 that is
    58 % of the full product's multiply-adds, as GEMMs on strided views (no copies). The entries
    below the diagonal blocks are never written; :meth:`InputStats.hessian_matrix` mirrors the
    upper triangle.
    """
    d = x.shape[1]
    for i in range(0, d, block):
        acc[i:i + block, i:].addmm_(x[:, i:i + block].t(), x[:, i:])


class InputStats:
    """Running statistics of one linear's calibration input (rows = tokens).

    ``sq_sum``: per-column sum of squares (Wanda); ``xtx``: sum of ``x x^T`` (SparseGPT; upper
    block rows only, see :func:`add_upper_gram`);
    ``gather``: all-gather the input over the TP group first (row-parallel, full Hessian).
    """

    def __init__(self, *, wanda: bool, hessian: bool, gather: bool = False):
        self.wanda, self.hessian, self.gather = wanda, hessian, gather
        self.num_tokens = 0
        self.sq_sum: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a ``[..., in]`` input batch."""
        x = x.detach().reshape(-1, x.shape[-1])
        if self.wanda:
            sq = x.float().pow(2).sum(dim=0).double()
            self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if self.hessian:
            if self.gather:
                tp, _, group = _tp()
                x = gather_last_dim(x, tp, group)
            xf = x.float()
            if self.xtx is None:
                self.xtx = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float32,
                                       device=xf.device)
            add_upper_gram(self.xtx, xf)
        self.num_tokens += x.shape[0]

    def hessian_matrix(self) -> torch.Tensor:
        """``H = 2/n sum x x^T`` (the full symmetric matrix)."""
        if self.xtx is None or self.num_tokens == 0:
            raise ValueError("no calibration input reached this layer")
        upper = self.xtx.triu()
        return upper.add_(upper.triu(1).t()).mul_(2.0 / self.num_tokens)

    def hook(self, module, args) -> None:
        self.add(args[0])


def prune_linear(layer, stats: InputStats | None, *, method: str, update_weight: bool,
                 block_size: int, percdamp: float, full_row_hessian: bool) -> torch.Tensor:
    """Choose the 2:4 mask of one sparse linear (and update its weight); returns the mask."""
    weight = layer.weight.detach()
    if method == "magnitude":
        mask = magnitude_mask(weight=weight)
        store_mask(layer, mask)
        return mask
    if method == "wanda":
        mask = wanda_mask(weight=weight, input_sq_sum=stats.sq_sum, num_tokens=stats.num_tokens)
        store_mask(layer, mask)
        return mask
    tp, rank, group = _tp()
    gather = full_row_hessian and tp > 1 and isinstance(layer, SparseRowParallelLinear)
    full = gather_last_dim(weight, tp, group) if gather else weight
    mask, new = sparsegpt_prune(weight=full, hessian=stats.hessian_matrix(),
                                update_weight=update_weight, block_size=block_size,
                                percdamp=percdamp)
    if gather:
        cols = weight.shape[1]
        mask = mask[:, rank * cols:(rank + 1) * cols].contiguous()
        new = None if new is None else new[:, rank * cols:(rank + 1) * cols].contiguous()
    store_mask(layer, mask, new_weight=new)
    return mask


class _InputsRecorded(Exception):
    """Ends a collecting forward once the layer's last sparse linear has recorded its input."""


def _stop_forward(module, args) -> None:
    raise _InputsRecorded


def peak_memory_mib() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, else peak RSS (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def prune_model(model: torch.nn.Module, tokens: torch.Tensor, *, method: str,
                update_weight: bool = False, micro_batch_size: int = 4, block_size: int = 128,
                percdamp: float = 0.01, full_row_hessian: bool = True,
                return_masks: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor | None]:
    """2:4-prune every sparse linear of a GPTModel, layer by layer, on ``[n, L]`` tokens.

    Masks become the layers' fixed 2:4 choices (see :mod:`megatron.sparse.prune.apply`); with
    ``update_weight`` (SparseGPT) the compensated weights replace the layer weights. Masking is
    enabled on return. Returns ``{layer name: local boolean mask}``; ``return_masks=False`` maps
    the names to None instead (the masks stay only in the layers: one boolean per weight less).
    """
    check_method(method, update_weight)
    log = log or (lambda msg: None)
    model.eval()
    set_mask_state(model, enabled=False)
    layers = list(model.decoder.layers)
    masks: dict[str, torch.Tensor | None] = {}
    needs_data = method != "magnitude"
    hidden: list[torch.Tensor] = []
    attn_mask = rope = None
    if needs_data:
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise ValueError(f"calibration tokens must be a non-empty [n, L] tensor, got shape "
                             f"{tuple(tokens.shape)}")
        device = next(model.parameters()).device
        tokens = tokens.to(device)
        seq = tokens.shape[1]
        attn_mask = causal_attention_mask(seq, device)
        rope = model.rotary_pos_emb(seq)
        for start in range(0, tokens.shape[0], micro_batch_size):
            batch = tokens[start:start + micro_batch_size]
            pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch.shape[0], -1)
            hidden.append(model.embedding(input_ids=batch, position_ids=pos))
    tp, _, _ = _tp()
    for index, layer in enumerate(layers):
        start_time = time.perf_counter()
        linears = sparse_layers(layer)
        stats: dict[str, InputStats] = {}
        if needs_data:
            handles = []
            for name, lin in linears:
                stats[name] = InputStats(
                    wanda=method == "wanda", hessian=method == "sparsegpt",
                    gather=(method == "sparsegpt" and full_row_hessian and tp > 1
                            and isinstance(lin, SparseRowParallelLinear)))
                handles.append(lin.register_forward_pre_hook(stats[name].hook))
            handles.append(linears[-1][1].register_forward_pre_hook(_stop_forward))
            try:
                with fused_causal_attention([layer]):
                    for h in hidden:
                        try:
                            layer(h, attention_mask=attn_mask, rotary_pos_emb=rope)
                        except _InputsRecorded:
                            pass
            finally:
                for handle in handles:
                    handle.remove()
        for name, lin in linears:
            mask = prune_linear(
                lin, stats.get(name), method=method, update_weight=update_weight,
                block_size=block_size, percdamp=percdamp, full_row_hessian=full_row_hessian)
            masks[f"decoder.layers.{index}.{name}"] = mask if return_masks else None
            del mask
        del stats  # frees this layer's Hessians before the next layer's are accumulated
        if needs_data and index + 1 < len(layers):
            # with update_weight the pruned entries are already 0 in the weights, so the dense
            # forward gives the masked result without a weight * mask copy per micro-batch
            set_mask_state(layer, enabled=not update_weight)
            with fused_causal_attention([layer]):
                for i, h in enumerate(hidden):
                    hidden[i] = layer(h, attention_mask=attn_mask, rotary_pos_emb=rope)[0]
            set_mask_state(layer, enabled=False)
        log(f"layer {index + 1}/{len(layers)}: {method} {time.perf_counter() - start_time:.1f}s, "
            f"peak memory {peak_memory_mib():.0f} MiB")
    set_mask_state(model, enabled=True)
    del hidden
    trim_heap()  # calibration buffers are free; a following checkpoint save starts lower
    return masks
