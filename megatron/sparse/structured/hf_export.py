"""Hugging Face layout of a structurally sliced model: config, remote code, class registration.

A uniform slice is a plain ``LlamaForCausalLM``. A heterogeneous one is written as a
``sliced_llama`` model: ``config.json`` with DeciLM-style ``block_configs`` (see
``hf_remote/configuration_sliced_llama.py``) plus the two remote-code files, so that plain
``transformers`` loads it with ``trust_remote_code=True``; inside megatron-sparse
:func:`register_sliced_llama` makes the Auto classes know it without remote code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron.sparse.structured.hetero import heads_per_group, layer_shapes

MODEL_TYPE = "sliced_llama"
REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_sliced_llama.py", "modeling_sliced_llama.py")
AUTO_MAP = {"AutoConfig": "configuration_sliced_llama.SlicedLlamaConfig",
            "AutoModelForCausalLM": "modeling_sliced_llama.SlicedLlamaForCausalLM"}


def hf_block_configs(args) -> list[dict[str, Any]]:
    """DeciLM-style ``block_configs`` of a sliced model's args."""
    per = heads_per_group(args)
    return [{"attention": {"no_op": s.num_query_groups == 0, "replace_with_linear": False,
                           "n_heads_in_group": per,
                           "num_key_value_heads": s.num_query_groups or None},
             "ffn": {"no_op": s.ffn_hidden_size == 0, "replace_with_linear": False,
                     "intermediate_size": s.ffn_hidden_size or None}}
            for s in layer_shapes(args)]


def sliced_hf_config(hf_config: dict[str, Any], args) -> dict[str, Any]:
    """The HF config of the sliced model ``args``, from the unsliced model's ``hf_config``."""
    cfg = {k: v for k, v in hf_config.items()
           if k not in ("block_configs", "auto_map", "quantization_config")}
    sizes = {"num_attention_heads": args.num_attention_heads,
             "num_key_value_heads": args.num_key_value_heads,
             "intermediate_size": args.intermediate_size, "head_dim": args.kv_channels}
    cfg.update(sizes)
    if not args.block_configs:
        return cfg | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    return cfg | {"model_type": MODEL_TYPE, "architectures": ["SlicedLlamaForCausalLM"],
                  "auto_map": dict(AUTO_MAP), "block_configs": hf_block_configs(args)}


def megatron_block_configs(hf_config: dict[str, Any]) -> list[dict[str, Any]]:
    """megatron-core ``block_configs`` from a ``sliced_llama`` HF config (the inverse)."""
    per = hf_config["num_attention_heads"] // hf_config["num_key_value_heads"]
    out = []
    for i, block in enumerate(hf_config["block_configs"]):
        attn, ffn = block["attention"], block["ffn"]
        if attn.get("n_heads_in_group", per) != per:
            raise ValueError(f"layer {i} of block_configs has n_heads_in_group "
                             f"{attn.get('n_heads_in_group')}, not {per}: per-layer query heads "
                             f"per KV head are not supported")
        out.append({"attention": {"no_op": bool(attn["no_op"]), "replace_with_linear": False,
                                  "num_query_groups": attn.get("num_key_value_heads")},
                    "mlp": {"no_op": bool(ffn["no_op"]), "replace_with_linear": False,
                            "ffn_hidden_size": ffn.get("intermediate_size")}})
    return out


def write_remote_code(directory: str | Path) -> None:
    """Copy the ``sliced_llama`` configuration and modeling files into an HF directory."""
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, Path(directory) / name)


def register_sliced_llama() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``sliced_llama`` without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron.sparse.structured.hf_remote.configuration_sliced_llama import SlicedLlamaConfig
    from megatron.sparse.structured.hf_remote.modeling_sliced_llama import SlicedLlamaForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, SlicedLlamaConfig)
        AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM)
    except ValueError:  # already registered in this process
        pass
