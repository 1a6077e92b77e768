"""Keep-probabilities of every unit, their per-pool budgets, sampling and the final masks.

Pools (each one global pool over all layers): ``heads`` (KV groups, ``[L, G]``), ``channels``
(MLP channels, ``[L, F]``) and ``blocks`` (``[L, 2]``: the attention and the MLP block of each
layer). A pool not in ``units`` stays at probability 1 and is never sampled.

Budget split (see docs/structured.md): the block pool keeps ``block_keep`` of the blocks; the
finer pools then keep ``r_f = keep / block_keep`` of their parameters. With both heads and
channels each pool keeps ``r_f`` of its units; with one of them the other stays whole and the
one pruned carries the whole budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.sparse.model import LlamaArgs
from megatron.sparse.structured.budget import project_to_budget, select_chunks
from megatron.sparse.structured.estimator import sample_mask
from megatron.sparse.structured.units import UnitMasks, attention_params_per_group, full_parameters

UNITS = ("channels", "heads", "blocks")
POOLS = ("kv_groups", "channels", "blocks")  # tensor names, in the order of their seeds


def parse_units(spec: str | list[str]) -> tuple[str, ...]:
    """``"channels,heads"`` -> ``("channels", "heads")``; one-line error for an unknown unit."""
    names = [u.strip() for u in (spec.split(",") if isinstance(spec, str) else spec) if u.strip()]
    unknown = [u for u in names if u not in UNITS]
    if unknown or not names:
        raise ValueError(f"unknown unit(s) {unknown or names!r} in --units; choose from "
                         f"{', '.join(UNITS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Budget:
    """The target: keep ratio of attention + MLP parameters and how the pools share it."""

    keep_ratio: float
    """Fraction of the attention + MLP parameters to keep, in (0, 1]."""
    units: tuple[str, ...]
    """Pruned pools, a subset of ``UNITS``."""
    block_keep: float = 0.9
    """Fraction of the 2 * L blocks kept when ``blocks`` is a unit."""
    channel_multiple: int = 32
    """Every kept MLP width is a multiple of this (4 * TP keeps 2:4 valid at TP)."""
    group_multiple: int = 1
    """Every kept KV-group count is a multiple of this (the TP size the result must run at)."""

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0.0 < self.block_keep <= 1.0:
            raise ValueError(f"--block-keep must be in (0, 1], got {self.block_keep}")
        if "blocks" in self.units and self.keep_ratio > self.block_keep:
            raise ValueError(f"--keep-ratio {self.keep_ratio} exceeds --block-keep "
                             f"{self.block_keep}: the kept blocks could not hold the budget; "
                             f"raise --block-keep")
        if self.channel_multiple < 1 or self.group_multiple < 1:
            raise ValueError("--channel-multiple and --group-multiple must be >= 1")

    def pool_fractions(self, args: LlamaArgs) -> dict[str, float]:
        """Target ``sum s / N`` of each pool (1 for pools that are not pruned)."""
        blocks = self.block_keep if "blocks" in self.units else 1.0
        fine = min(1.0, self.keep_ratio / blocks)
        heads_p = args.num_key_value_heads * attention_params_per_group(args)
        chan_p = args.intermediate_size * 3 * args.hidden_size
        frac = {"kv_groups": 1.0, "channels": 1.0, "blocks": blocks}
        if "heads" in self.units and "channels" in self.units:
            frac["kv_groups"] = frac["channels"] = fine
        elif "channels" in self.units:
            frac["channels"] = (fine * (heads_p + chan_p) - heads_p) / chan_p
        elif "heads" in self.units:
            frac["kv_groups"] = (fine * (heads_p + chan_p) - chan_p) / heads_p
        for name, f in frac.items():
            if f <= 0:
                raise ValueError(f"--keep-ratio {self.keep_ratio} cannot be met by pruning "
                                 f"{' and '.join(self.units)} alone; add more --units or "
                                 f"raise --keep-ratio")
        return frac


@dataclass
class KeepProbs:
    """Bernoulli keep-probabilities (stored directly, in [0, 1]) of every unit."""

    kv_groups: torch.Tensor
    """float ``[L, G]``."""
    channels: torch.Tensor
    """float ``[L, F]``."""
    blocks: torch.Tensor
    """float ``[L, 2]``: attention block, MLP block."""

    @classmethod
    def uniform(cls, args: LlamaArgs, budget: Budget) -> "KeepProbs":
        f = budget.pool_fractions(args)
        n = args.num_layers
        return cls(kv_groups=torch.full((n, args.num_key_value_heads), f["kv_groups"]),
                   channels=torch.full((n, args.intermediate_size), f["channels"]),
                   blocks=torch.full((n, 2), f["blocks"]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in POOLS}

    def project(self, args: LlamaArgs, budget: Budget) -> None:
        """Project every pool onto its budget in place (never raises a probability)."""
        for name, f in budget.pool_fractions(args).items():
            t = getattr(self, name)
            setattr(self, name, project_to_budget(t, f * t.numel()))

    def sample(self, *, seed: int, step: int, sample: int, units: tuple[str, ...]) -> UnitMasks:
        """One mask ``m ~ Bernoulli(s)`` of the pruned pools (others all kept)."""
        drawn = {}
        for pool, (name, t) in enumerate(self.tensors().items()):
            unit = {"kv_groups": "heads"}.get(name, name)
            drawn[name] = (sample_mask(t, seed=seed, step=step, sample=sample, pool=pool)
                           if unit in units else torch.ones_like(t, dtype=torch.bool))
        return UnitMasks(kv_groups=drawn["kv_groups"], channels=drawn["channels"],
                         attention=drawn["blocks"][:, 0], mlp=drawn["blocks"][:, 1])

    def final_masks(self, args: LlamaArgs, budget: Budget) -> UnitMasks:
        """Deterministic masks at the parameter budget (see docs/structured.md, "Final mask")."""
        n, h = args.num_layers, args.hidden_size
        frac = budget.pool_fractions(args)
        blocks = torch.ones(n, 2, dtype=torch.bool)
        if "blocks" in budget.units:
            k = max(1, round(frac["blocks"] * 2 * n))
            order = torch.argsort(self.blocks.flatten().double(), descending=True, stable=True)
            flat = torch.zeros(2 * n, dtype=torch.bool)
            flat[order[:k]] = True
            blocks = flat.reshape(n, 2)
        attention, mlp = blocks[:, 0], blocks[:, 1]
        per_group = attention_params_per_group(args)
        left = budget.keep_ratio * full_parameters(args) - h * int(blocks.sum())
        groups_total = args.num_key_value_heads * int(attention.sum())
        chans_total = args.intermediate_size * int(mlp.sum())
        if "heads" in budget.units:
            count = (round(frac["kv_groups"] * groups_total) if "channels" in budget.units
                     else int((left - chans_total * 3 * h) // per_group))
            groups = select_chunks(self.kv_groups, attention, count=min(count, groups_total),
                                   multiple=budget.group_multiple)
        else:
            groups = attention[:, None].expand(n, args.num_key_value_heads).clone()
        left -= int(groups.sum()) * per_group
        if "channels" in budget.units:
            count = int(left // (3 * h))
            channels = select_chunks(self.channels, mlp, count=min(count, chans_total),
                                     multiple=budget.channel_multiple)
        else:
            channels = mlp[:, None].expand(n, args.intermediate_size).clone()
        masks = UnitMasks(kv_groups=groups, channels=channels, attention=attention, mlp=mlp)
        if masks.kept_parameters(args) > budget.keep_ratio * full_parameters(args) + 0.5:
            raise ValueError(f"--keep-ratio {budget.keep_ratio} is below what the kept blocks "
                             f"need at minimum width; raise it or lower --block-keep")
        return masks

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], args: LlamaArgs) -> "KeepProbs":
        probs = cls(**{name: state[name].float() for name in POOLS})
        want = {"kv_groups": (args.num_layers, args.num_key_value_heads),
                "channels": (args.num_layers, args.intermediate_size),
                "blocks": (args.num_layers, 2)}
        for name, shape in want.items():
            if tuple(getattr(probs, name).shape) != shape:
                raise ValueError(f"the saved keep-probabilities '{name}' have shape "
                                 f"{tuple(getattr(probs, name).shape)}, the model needs {shape}: "
                                 f"the state belongs to another model; use a fresh --save")
        return probs
