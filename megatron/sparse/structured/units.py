"""Structural units of a LLaMA model and the keep/remove decision for each of them.

A *unit* is what structural pruning removes as a whole:

* a KV group: one KV head together with its ``num_attention_heads / num_key_value_heads`` query
  heads (their q, k, v rows and their columns of the output projection);
* an MLP channel: one intermediate channel of the SwiGLU MLP (a row of gate and up, a column of
  down);
* a whole attention block or a whole MLP block of a layer (its norm included).

:class:`UnitMasks` holds one boolean per unit. Its canonical form (:meth:`UnitMasks.canonical`)
is what a sliced model realises: a block is kept iff its block flag is set *and* it keeps at least
one group / channel; a removed block keeps no groups / channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.sparse.model import LlamaArgs

_FIELDS = ("kv_groups", "channels", "attention", "mlp")


@dataclass
class UnitMasks:
    """Keep (True) / remove (False) flags of every structural unit of a model."""

    kv_groups: torch.Tensor
    """bool ``[num_layers, num_key_value_heads]``: keep this KV group (KV head + query heads)."""
    channels: torch.Tensor
    """bool ``[num_layers, intermediate_size]``: keep this MLP intermediate channel."""
    attention: torch.Tensor
    """bool ``[num_layers]``: keep this layer's attention block at all."""
    mlp: torch.Tensor
    """bool ``[num_layers]``: keep this layer's MLP block at all."""

    def __post_init__(self) -> None:
        for name in _FIELDS:
            setattr(self, name, torch.as_tensor(getattr(self, name)).to(torch.bool).cpu())

    @classmethod
    def full(cls, args: LlamaArgs) -> "UnitMasks":
        """Every unit kept (the dense model)."""
        n = args.num_layers
        return cls(kv_groups=torch.ones(n, args.num_key_value_heads, dtype=torch.bool),
                   channels=torch.ones(n, args.intermediate_size, dtype=torch.bool),
                   attention=torch.ones(n, dtype=torch.bool), mlp=torch.ones(n, dtype=torch.bool))

    def shapes_for(self, args: LlamaArgs) -> dict[str, tuple[int, ...]]:
        n = args.num_layers
        return {"kv_groups": (n, args.num_key_value_heads), "channels": (n, args.intermediate_size),
                "attention": (n,), "mlp": (n,)}

    def validate(self, args: LlamaArgs) -> None:
        """Raise a one-line ValueError if these masks do not fit the model ``args``."""
        for name, shape in self.shapes_for(args).items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"unit mask '{name}' has shape {got} but the model needs "
                                 f"{shape}; the masks belong to another model")

    def canonical(self) -> "UnitMasks":
        """The same model with redundant flags resolved (see the module docstring)."""
        attention = self.attention & self.kv_groups.any(dim=1)
        mlp = self.mlp & self.channels.any(dim=1)
        return UnitMasks(kv_groups=self.kv_groups & attention[:, None],
                         channels=self.channels & mlp[:, None], attention=attention, mlp=mlp)

    def kv_groups_per_layer(self) -> torch.Tensor:
        """int ``[num_layers]``: KV groups kept per layer (0: attention block removed)."""
        return self.canonical().kv_groups.sum(dim=1)

    def channels_per_layer(self) -> torch.Tensor:
        """int ``[num_layers]``: MLP width kept per layer (0: MLP block removed)."""
        return self.canonical().channels.sum(dim=1)

    def kept_parameters(self, args: LlamaArgs) -> int:
        """Attention + MLP parameters (linear weights and the blocks' pre-norms) the masks keep.

        Embeddings, the final norm and the output layer are not counted.
        """
        c = self.canonical()
        h = args.hidden_size
        per_group = attention_params_per_group(args)
        attn = int(c.kv_groups.sum()) * per_group + int(c.attention.sum()) * h
        mlp = int(c.channels.sum()) * 3 * h + int(c.mlp.sum()) * h
        return attn + mlp

    def save(self, path: str | Path) -> None:
        """Write the masks to ``path`` (``.npz``; via a temporary file and a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{name: getattr(self, name).numpy().astype(np.uint8) for name in _FIELDS})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, args: LlamaArgs | None = None) -> "UnitMasks":
        """Read masks written by :meth:`save`; with ``args``, check that they fit that model."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [name for name in _FIELDS if name not in data.files]
                if missing:
                    raise ValueError(f"{path} is not a unit-mask file (missing {missing}); "
                                     f"write it with tools/prune_structured.py")
                masks = cls(**{name: torch.from_numpy(data[name].astype(bool)) for name in _FIELDS})
        except (OSError, EOFError) as err:
            raise ValueError(f"cannot read unit masks from {path} ({err}); pass the .npz "
                             f"written by tools/prune_structured.py") from None
        if args is not None:
            masks.validate(args)
        return masks


def attention_params_per_group(args: LlamaArgs) -> int:
    """Linear weights of one KV group: its q, k, v rows and its output-projection columns."""
    heads_per_group = args.num_attention_heads // args.num_key_value_heads
    d = args.kv_channels
    return (2 * heads_per_group + 2) * d * args.hidden_size


def full_parameters(args: LlamaArgs) -> int:
    """Attention + MLP parameters of the dense model (the denominator of a keep ratio)."""
    return UnitMasks.full(args).kept_parameters(args)
