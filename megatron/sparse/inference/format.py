"""The compressed 2:4 weight format: half the values plus a 2-bit position per kept value.

A 2:4 weight ``W`` ``[rows, in]`` keeps 2 of every group of 4 consecutive input columns of a row
(DESIGN "Sparse layers"). It is stored as

- ``values`` ``[rows, in / 2]``, the weight's dtype: the two kept weights of each group, in column
  order (group ``g`` holds ``values[:, 2g]`` and ``values[:, 2g + 1]``);
- ``meta`` ``[rows, ceil(in / 8)]`` uint8: one nibble per group, ``i0 | i1 << 2`` with
  ``i0 < i1`` the kept positions (0..3) within the group; group ``2j`` is the low nibble of byte
  ``j``, group ``2j + 1`` the high one.

Read as a little-endian bit string, a row's ``meta`` is the sequence of 2-bit positions of its
values, value ``v`` at bits ``2v .. 2v + 1``: the same idea as the cuSPARSELt / CUTLASS 2:4
metadata, laid out for the CPU kernel (``csrc/sparse24_matmul.c``). Bytes moved per weight: 2.125
of fp32's 4 (0.53x), 1.125 of bf16's 2 (0.56x). ``decompress(compress(W, M)) == W * M`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compressed24:
    """A compressed 2:4 weight (layout in the module docstring)."""

    values: torch.Tensor
    """``[rows, in / 2]`` kept weights, the original dtype."""
    meta: torch.Tensor
    """``[rows, ceil(in / 8)]`` uint8 position nibbles."""
    in_features: int
    """Input columns of the dense weight."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, in)`` of the dense weight."""
        return self.values.shape[0], self.in_features


def _groups(weight: torch.Tensor, name: str) -> torch.Tensor:
    if weight.ndim != 2 or weight.shape[1] % 4 != 0:
        raise ValueError(f"{name}: a 2:4 weight must be 2-D with input columns divisible by 4, "
                         f"got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1, 4)


def kept_positions(weight: torch.Tensor, mask: torch.Tensor | None = None, *,
                   name: str = "weight") -> torch.Tensor:
    """``[rows, in / 4, 2]`` sorted kept positions per group: ``mask``'s (exactly 2 per group),
    or without a mask the nonzeros of ``weight`` (at most 2 per group; a group with fewer keeps
    its lowest zero positions). One-line ValueError if the weight is not 2:4."""
    if mask is not None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match the weight's "
                             f"{tuple(weight.shape)}")
        keep = _groups(mask.to(device=weight.device, dtype=torch.bool), name)
        if not bool((keep.sum(-1) == 2).all()):
            raise ValueError(f"{name}: mask is not 2:4 (every group of 4 input columns must keep "
                             f"exactly 2)")
    else:
        keep = _groups(weight, name) != 0
        if not bool((keep.sum(-1) <= 2).all()):
            raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} is not 2:4 (a group "
                             f"of 4 input columns has more than 2 nonzeros); prune it first or "
                             f"pass its mask")
    order = torch.arange(3, -1, -1, device=weight.device, dtype=torch.int64)
    score = keep.to(torch.int64) * 4 + order  # kept first, then the lowest positions
    return score.topk(2, dim=-1).indices.sort(dim=-1).values


def compress(weight: torch.Tensor, mask: torch.Tensor | None = None, *,
             name: str = "weight") -> Compressed24:
    """The compressed form of ``weight * mask`` (or of an already 2:4 ``weight``)."""
    weight = weight.detach()
    pos = kept_positions(weight, mask, name=name)
    rows, groups = pos.shape[:2]
    values = _groups(weight, name).gather(-1, pos).reshape(rows, groups * 2).contiguous()
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    if groups % 2:
        nibble = torch.cat([nibble, nibble.new_zeros(rows, 1)], dim=1)
    meta = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()
    return Compressed24(values=values, meta=meta, in_features=weight.shape[1])


def positions(packed: Compressed24) -> torch.Tensor:
    """``[rows, in / 4, 2]`` kept positions decoded from ``meta``."""
    groups = packed.in_features // 4
    meta = packed.meta.to(torch.int64)
    nibble = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack([nibble & 3, nibble >> 2], dim=-1)


def decompress(packed: Compressed24) -> torch.Tensor:
    """The dense ``[rows, in]`` weight (zeros at the pruned positions)."""
    rows, cols = packed.shape
    dense = packed.values.new_zeros(rows, cols // 4, 4)
    dense.scatter_(-1, positions(packed), packed.values.reshape(rows, -1, 2))
    return dense.reshape(rows, cols)


def mask_of(packed: Compressed24) -> torch.Tensor:
    """The boolean ``[rows, in]`` 2:4 mask."""
    rows, cols = packed.shape
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=packed.meta.device)
    keep.scatter_(-1, positions(packed), True)
    return keep.reshape(rows, cols)
