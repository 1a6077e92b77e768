"""HF-side perplexity with ``transformers`` alone, and applying a packed mask file to a model.

Same protocol as :mod:`megatron.sparse.eval.perplexity` (same windows, each predicting its
tokens 1..L-1, exp of the mean cross entropy), so both sides agree on the same weights and masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.sparse.eval.perplexity import PerplexityResult
from megatron.sparse.export.maskfile import MASK_SUFFIX, expected_mask_shapes, load_mask_file


@torch.no_grad()
def hf_perplexity(model, windows: torch.Tensor, *, micro_batch_size: int = 1) -> PerplexityResult:
    """PPL of a HF causal LM over ``[n, L]`` windows."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, L >= 2] tensor, got "
                         f"{tuple(windows.shape)}")
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in range(0, windows.shape[0], micro_batch_size):
        batch = windows[start:start + micro_batch_size].to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                 batch[:, 1:].reshape(-1), reduction="none")
        total += losses.double().sum().cpu()
        count += losses.numel()
    return PerplexityResult(nll_sum=float(total), tokens=count, seq_length=windows.shape[1])


@torch.no_grad()
def apply_mask_file(model, path) -> int:
    """Multiply the HF model's projection weights by the masks of a packed mask file.

    The file must hold exactly the masks of this model's architecture (checked, with one-line
    errors). Returns the number of masked weights.
    """
    masks = load_mask_file(path, expected_mask_shapes(model.config))
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        name = key[: -len(MASK_SUFFIX)] + ".weight"
        if name not in params:
            raise ValueError(f"mask file entry {key}: the model has no parameter {name}")
        weight = params[name]
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))
    return len(masks)


def load_hf_model(spec: str, *, dtype=torch.float32, trust_remote_code: bool = False):
    """A ``transformers`` causal LM: ``embedded`` (the dequantized SmolLM2 GGUF) or a HF dir.

    A directory whose config has an ``auto_map`` (custom modeling code) loads with
    ``trust_remote_code`` when its modeling file is the one megatron-sparse's SLoRB export writes,
    or when ``trust_remote_code`` is given; any other custom code is refused.
    """
    if spec == "embedded":
        from megatron.sparse.embedded import load_embedded_model

        return load_embedded_model().to(dtype).eval()
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from megatron.sparse.export.slorb_hf import ships_our_modeling_file

    config = Path(spec) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model {spec}: not 'embedded' or a Hugging Face model "
                                f"directory with config.json")
    remote = "auto_map" in json.loads(config.read_text())
    if remote and not (trust_remote_code or ships_our_modeling_file(spec)):
        raise ValueError(f"--model {spec} needs its own modeling code (config auto_map) that is "
                         f"not megatron-sparse's SLoRB file; pass --trust-remote-code if you "
                         f"trust it")
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype,
                                                trust_remote_code=remote).eval()
