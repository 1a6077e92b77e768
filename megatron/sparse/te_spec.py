"""transformer-engine variant of the layer spec (GPU extra; never required)."""

from __future__ import annotations

import importlib.util

from megatron.core.transformer.spec_utils import ModuleSpec


def te_available() -> bool:
    """True when transformer-engine is importable and a GPU is present."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def te_base_spec() -> ModuleSpec:
    """Local spec with TE norms and TE core attention; the linears are replaced by the caller."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = TENorm
    spec.submodules.pre_mlp_layernorm = TENorm
    spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
    return spec
