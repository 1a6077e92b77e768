"""Greedy generation with timings (prefill, per-token decode) for a ``transformers`` causal LM."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    """What :func:`greedy_generate` produced and how long it took."""

    tokens: list[int]
    """The new token ids (without the prompt)."""
    prefill_s: float
    """Seconds of the prompt's forward pass (which yields the first new token)."""
    decode_s: float
    """Seconds of the remaining ``len(tokens) - 1`` single-token steps."""

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput at batch 1 (new tokens after the first, per second)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


@functools.cache
def _cache_arg() -> str:
    """transformers >= 5.x names the KV cache ``cache``, earlier versions ``past_key_values``."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def _cache_of(out):
    return getattr(out, _cache_arg())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                    eos_token_id: int | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens (fewer if ``eos_token_id`` comes) after the
    ``[1, T]`` prompt ``input_ids``, with the model's KV cache."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    _sync(device)
    prefill = time.perf_counter() - start
    past, start = _cache_of(out), time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        out = model(input_ids=token, use_cache=True, **{_cache_arg(): past})
        past, token = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    _sync(device)
    return Generation(tokens=tokens, prefill_s=prefill, decode_s=time.perf_counter() - start)


def timed_forward(model, input_ids: torch.Tensor) -> float:
    """Seconds of one forward pass over ``input_ids`` without a cache (prefill timing)."""
    device = input_ids.device
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        _sync(device)
    return time.perf_counter() - start


def load_for_inference(spec: str, *, mask_file: str | None = None, sparse_kernels: bool = False,
                       dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A HF causal LM (``embedded`` or a directory, e.g. tools/export_hf.py's output) with the
    optional packed mask file applied: as compressed :class:`SparseLinear24` layers when
    ``sparse_kernels`` (every 2:4 linear, masked or already sparse), else multiplied into the
    dense weights. Returns ``(model, swapped module names)``."""
    from megatron.sparse.eval.hf_perplexity import apply_mask_file, load_hf_model
    from megatron.sparse.inference.sparsify import sparsify

    model = load_hf_model(spec, dtype=dtype)
    swapped: list[str] = []
    with torch.no_grad():
        if sparse_kernels:
            swapped = sparsify(model, masks=mask_file)
            if not swapped:
                raise ValueError(f"--model {spec}: no 2:4 linear layer found (pass the mask file "
                                 f"of a dense checkpoint with --mask)")
        elif mask_file is not None:
            apply_mask_file(model, mask_file)
    return model.to(device), swapped
