"""``sparsify(model)``: swap the 2:4 ``nn.Linear`` layers of a model for :class:`SparseLinear24`
(plus a dense SLoRB side branch where the linear has one)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megatron.sparse.inference.format import kept_positions
from megatron.sparse.inference.module import DispatchConfig, SparseLinear24

MASK_SUFFIX = ".weight.mask"


class SLoRBSparseLinear24(nn.Module):
    """A compressed 2:4 linear plus its SLoRB side branch ``(x X^T) S^T`` (docs/slorb.md), which
    cannot fold into a 2:4 weight and stays a small dense matmul."""

    def __init__(self, *, sparse: SparseLinear24, k: int, S: torch.Tensor,
                 X: torch.Tensor | None = None):
        super().__init__()
        self.sparse = sparse
        self.slorb_k = k
        self.register_buffer("slorb_S", S.detach().clone())
        self.register_buffer("slorb_X", None if X is None else X.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.view(*x.shape[:-1], x.shape[-1] // self.slorb_k, self.slorb_k)
        sums = grouped.sum(-1) if self.slorb_X is None else (grouped * self.slorb_X).sum(-1)
        return self.sparse(x) + F.linear(sums, self.slorb_S.to(x.dtype))


def _compressed(module: nn.Linear, mask, config, name: str) -> nn.Module:
    sparse = SparseLinear24.from_linear(module, mask, config=config, name=name)
    if getattr(module, "slorb_S", None) is None:
        return sparse
    return SLoRBSparseLinear24(sparse=sparse, k=module.slorb_k, S=module.slorb_S,
                               X=module.slorb_X)


def _load_masks(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    if masks is None:
        return {}
    if isinstance(masks, (str, Path)):
        from megatron.sparse.export.maskfile import expected_mask_shapes, load_mask_file

        return load_mask_file(masks, expected_mask_shapes(model.config))
    return dict(masks)


def _is_two_four(weight: torch.Tensor) -> bool:
    try:
        kept_positions(weight)
    except ValueError:
        return False
    return True


@torch.no_grad()
def sparsify(model: nn.Module, masks=None, *, config: DispatchConfig | None = None,
             skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace, in place, each ``nn.Linear`` of ``model`` whose weight is 2:4 by a compressed
    :class:`SparseLinear24`; returns the names of the swapped modules.

    ``masks``: None (a weight qualifies when every group of 4 input columns has at most 2
    nonzeros, as in our masked export), a packed mask file path (``masks.npz`` of
    tools/export_hf.py, keys ``<module>.weight.mask``; checked against ``model.config``) or a
    ``{key: bool mask}`` dict with those keys. A linear with a mask is compressed as
    ``weight * mask``. Linears named in ``skip`` (last name component) and non-2:4 linears without
    a mask are left dense. A SLoRB projection (``slorb_S``, a SLoRB export's modeling file)
    becomes a :class:`SLoRBSparseLinear24`: the compressed weight plus the dense side branch.
    """
    found = _load_masks(model, masks)
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        mask = found.get(name + MASK_SUFFIX)
        if mask is None and not _is_two_four(module.weight):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _compressed(module, mask, config, name))
        swapped.append(name)
    unused = set(found) - {n + MASK_SUFFIX for n in swapped}
    if unused:
        raise ValueError(f"{len(unused)} mask(s) name no nn.Linear of the model, first "
                         f"{sorted(unused)[0]}")
    return swapped
