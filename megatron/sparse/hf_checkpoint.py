"""Reading and writing Hugging Face LLaMA checkpoints (safetensors; .bin only weights_only)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.sparse.embedded import embedded_model_dir

EMBEDDED = "embedded"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class HFCheckpoint:
    """A loaded HF checkpoint: its config dict, tensors, and where its tokenizer comes from."""

    config: dict
    state: dict[str, torch.Tensor]
    tokenizer: str | None
    """``embedded``, a directory that ``load_tokenizer`` understands, or None (no files)."""


def _resolve(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"--hf {spec} is a file; pass the checkpoint directory")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors",
                                                               "*.model", "*.txt"]))
        except Exception as exc:  # offline, unknown id, gated repo
            raise FileNotFoundError(f"cannot fetch {spec} from the Hugging Face hub "
                                    f"({type(exc).__name__}); pass a local directory") from None
    raise FileNotFoundError(f"--hf {spec}: no such directory (nor 'embedded' or a hub id)")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is a pickle checkpoint that needs arbitrary code to load; it is "
                         f"refused for safety: convert it to safetensors with a trusted tool "
                         f"first") from None


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (safetensors preferred)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(directory.glob("pytorch_model*.bin")) or sorted(directory.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors or pytorch_model*.bin")
    state = {}
    for f in files:
        state.update(_load_bin(f))
    return state


def load_hf_checkpoint(spec: str) -> HFCheckpoint:
    """Load ``embedded``, a local HF directory, or a hub id (when the network allows)."""
    if spec == EMBEDDED:
        from megatron.sparse.embedded import load_embedded_model

        model = load_embedded_model()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return HFCheckpoint(config=config, state=state, tokenizer=EMBEDDED)
    directory = _resolve(spec)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint")
    config = json.loads(config_path.read_text())
    has_tokenizer = any((directory / f).is_file() for f in TOKENIZER_FILES)
    return HFCheckpoint(config=config, state=load_state(directory),
                        tokenizer=str(directory) if has_tokenizer else None)


def save_tokenizer(tokenizer_spec: str, out: Path) -> None:
    """Write the tokenizer files of ``tokenizer_spec`` into ``out``."""
    from megatron.sparse.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    else:
        shutil.copy(tokenizer_spec, out / "tokenizer.model")


def save_hf_checkpoint(out: str | Path, *, config: dict, state: dict[str, torch.Tensor],
                       tokenizer: str | None, overwrite: bool = False,
                       extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer, + ``{name: text}`` extra files such
    as a modeling file) to ``out`` atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer:
            save_tokenizer(tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = ["HFCheckpoint", "load_hf_checkpoint", "save_hf_checkpoint", "embedded_model_dir"]
