"""Hugging Face export of SLoRB models: config fields and the modeling file shipped alongside.

An exported SLoRB model is a LLaMA directory whose ``config.json`` has ``model_type``
``"slorb_llama"``, ``slorb_k``, ``slorb_train_projection`` and an ``auto_map`` to
``modeling_slorb_llama.py`` (copied into the directory), so ``transformers`` loads it with
``trust_remote_code=True`` and refuses it without (no silent plain-LLaMA load). Its safetensors
hold, per projection, ``...{q,k,v,o,gate,up,down}_proj.slorb_S`` and, with a trained projection,
``...slorb_X`` (docs/export.md, "SLoRB").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.sparse import slorb

MODELING_FILE = "modeling_slorb_llama.py"
_SOURCE = Path(__file__).with_name(MODELING_FILE)
MODEL_CLASS = "SLoRBLlamaForCausalLM"
CONFIG_CLASS = "SLoRBLlamaConfig"


def modeling_source() -> str:
    """The text of the modeling file this megatron-sparse writes into exports."""
    return _SOURCE.read_text()


def hf_export_parts(meta: dict[str, Any], config: dict) -> tuple[dict, dict[str, str]]:
    """``(config, extra files)`` of a HF export of a checkpoint with ``meta``.

    Without SLoRB both come back unchanged (no files); with it the config becomes a
    ``slorb_llama`` config and the modeling file is added.
    """
    settings = meta.get(slorb.META_KEY)
    if not settings:
        return config, {}
    stem = MODELING_FILE.removesuffix(".py")
    config = {**config, "model_type": "slorb_llama", "architectures": [MODEL_CLASS],
              "slorb_k": int(settings["k"]),
              "slorb_train_projection": bool(settings["train_projection"]),
              "auto_map": {"AutoConfig": f"{stem}.{CONFIG_CLASS}",
                           "AutoModelForCausalLM": f"{stem}.{MODEL_CLASS}"}}
    return config, {MODELING_FILE: modeling_source()}


def ships_our_modeling_file(directory: str | Path) -> bool:
    """Whether ``directory`` holds exactly the modeling file megatron-sparse writes."""
    path = Path(directory) / MODELING_FILE
    return path.is_file() and path.read_text() == modeling_source()
