"""Config of a structurally sliced LLaMA (per-layer sizes), loaded with ``trust_remote_code``.

Written by megatron-sparse next to the weights. The layout follows the published Nemotron-NAS
(DeciLM) ``block_configs``: one entry per layer, ``{"attention": {...}, "ffn": {...}}`` with
``no_op`` (block removed, its norm too), ``replace_with_linear`` (always false here) and
``n_heads_in_group`` (query heads per KV head). Two fields are added because DeciLM's
``n_heads_in_group`` and ``ffn_mult`` cannot express removed query heads and exact widths:
``attention.num_key_value_heads`` (KV groups kept, each with its ``n_heads_in_group`` query heads)
and ``ffn.intermediate_size`` (MLP channels kept). The model-level sizes are the unsliced ones.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class SlicedLlamaConfig(LlamaConfig):
    model_type = "sliced_llama"

    block_configs: list | None = None
