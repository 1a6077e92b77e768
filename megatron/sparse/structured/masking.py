"""Structural masks applied to a megatron-core GPTModel by forward pre-hooks.

Two hooks per decoder layer realise every unit of :mod:`megatron.sparse.structured.units`:

* on ``self_attention.linear_proj`` (the output projection): the attention output
  ``[s, b, heads * head_dim]`` is multiplied per KV group (a group's query heads are contiguous
  in megatron's layout) by ``kv_groups[l, g] * attention[l]``;
* on ``mlp.linear_fc2``: ``act(gate x) * (up x)`` ``[s, b, ffn]`` is multiplied per channel by
  ``channels[l, c] * mlp[l]``.

A removed block thus adds exactly 0 to the residual stream. Under tensor parallelism each rank
holds a contiguous shard of the KV groups and channels, so its hook multiplies by its slice of
the unsharded masks; the masks themselves are set unsharded on every rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron.sparse.model import LlamaArgs
from megatron.sparse.structured.units import UnitMasks


def _tp() -> tuple[int, int]:
    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    return 1, 0


class UnitMasker:
    """Owns the masking hooks of a model; :meth:`set` chooses the masks, :meth:`remove` unhooks.

    Masks are float multipliers (0/1 for sampled or final masks); ``None`` disables masking.
    """

    def __init__(self, model: torch.nn.Module, args: LlamaArgs):
        self.args = args
        tp, rank = _tp()
        self._groups = slice(rank * args.num_key_value_heads // tp,
                             (rank + 1) * args.num_key_value_heads // tp)
        self._channels = slice(rank * args.intermediate_size // tp,
                               (rank + 1) * args.intermediate_size // tp)
        self._width = args.num_attention_heads // args.num_key_value_heads * args.kv_channels
        self._attn: torch.Tensor | None = None
        self._mlp: torch.Tensor | None = None
        self._handles = []
        for index, layer in enumerate(model.decoder.layers):
            self._handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                self._hook(index, attention=True)))
            self._handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                self._hook(index, attention=False)))

    def _hook(self, index: int, *, attention: bool):
        def hook(module, inputs):
            scale = self._attn if attention else self._mlp
            if scale is None:
                return None
            x = inputs[0]
            return (x * scale[index].to(device=x.device, dtype=x.dtype),) + tuple(inputs[1:])
        return hook

    def set(self, masks: UnitMasks | None) -> None:
        """Apply ``masks`` (unsharded, see :class:`UnitMasks`) from the next forward on."""
        if masks is None:
            self._attn = self._mlp = None
            return
        self.set_scales(kv_groups=masks.kv_groups, channels=masks.channels,
                        attention=masks.attention, mlp=masks.mlp)

    def set_scales(self, *, kv_groups: torch.Tensor, channels: torch.Tensor,
                   attention: torch.Tensor, mlp: torch.Tensor) -> None:
        """Like :meth:`set`, from ``[L, G]``, ``[L, F]``, ``[L]``, ``[L]`` tensors (bool/float)."""
        groups = kv_groups[:, self._groups].float() * attention.float()[:, None]
        self._attn = groups.repeat_interleave(self._width, dim=1)
        self._mlp = channels[:, self._channels].float() * mlp.float()[:, None]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attn = self._mlp = None
