"""LLaMA whose projections carry SLoRB side branches (written by megatron-sparse's export).

Load with ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``. Every
projection of every decoder layer (``q/k/v/o_proj``, ``gate/up/down_proj``) computes::

    y = x W^T + (x X^T) S^T

``W`` is the (2:4-masked) weight, ``S = slorb_S [out, in / k]`` and ``X`` the k-group-sum
projection: ``(x X^T)[..., i] = sum_m X_g[i, m] x[..., i k + m]`` with ``X_g = slorb_X [in / k, k]``
when the projection was trained (config ``slorb_train_projection``), all ones otherwise (then no
``slorb_X`` tensor exists). ``k`` is config ``slorb_k``. This file needs only torch and
transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class SLoRBLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus the SLoRB group size and whether the projection is stored."""

    model_type = "slorb_llama"

    def __init__(self, slorb_k: int = 16, slorb_train_projection: bool = False, **kwargs):
        self.slorb_k = slorb_k
        self.slorb_train_projection = slorb_train_projection
        super().__init__(**kwargs)


class SLoRBLinear(nn.Linear):
    """``nn.Linear`` plus the side branch ``(x X^T) S^T``."""

    def __init__(self, in_features: int, out_features: int, *, k: int, train_projection: bool,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if in_features % k != 0:
            raise ValueError(f"slorb_k={k} does not divide the projection input {in_features}")
        self.slorb_k = k
        self.slorb_S = nn.Parameter(torch.zeros(out_features, in_features // k, device=device,
                                                dtype=dtype))
        if train_projection:
            self.slorb_X = nn.Parameter(torch.ones(in_features // k, k, device=device,
                                                   dtype=dtype))
        else:
            self.register_parameter("slorb_X", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.view(*x.shape[:-1], x.shape[-1] // self.slorb_k, self.slorb_k)
        sums = grouped.sum(-1) if self.slorb_X is None else (grouped * self.slorb_X).sum(-1)
        return super().forward(x) + nn.functional.linear(sums, self.slorb_S)


class SLoRBLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose decoder projections are :class:`SLoRBLinear`."""

    config_class = SLoRBLlamaConfig

    def __init__(self, config: SLoRBLlamaConfig):
        super().__init__(config)
        for layer in self.model.layers:
            for path in PROJECTIONS:
                owner_name, name = path.split(".")
                owner = getattr(layer, owner_name)
                old = getattr(owner, name)
                setattr(owner, name, SLoRBLinear(
                    old.in_features, old.out_features, k=config.slorb_k,
                    train_projection=config.slorb_train_projection, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype))
