"""Greedy generation with timings (prefill and per-token decode) for a ``transformers`` causal LM."""

from __future__ import annotations

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
    past, start = out.past_key_values, time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
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
