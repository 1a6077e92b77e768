"""Calibration token windows for one-shot pruning.

``embedded``: the training split of the embedded Wikipedia corpus, articles joined with
"\\n\\n", tokenized once with the checkpoint's tokenizer and cut into non-overlapping windows;
anything else is the prefix of a tokenized ``.bin``/``.idx`` dataset (``tools/preprocess_data.py``)
read as non-overlapping windows from its start. ``offset`` skips that many windows first (a
second, disjoint calibration draw). Too little data is a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron.sparse.eval.datasets import tokenize_text


def calibration_windows(spec: str, *, tokenizer_spec: str | None, seq_length: int,
                        num_samples: int, vocab_size: int | None = None,
                        offset: int = 0) -> torch.Tensor:
    """``[num_samples, seq_length]`` calibration tokens of ``spec`` (see module docstring)."""
    if num_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {num_samples}")
    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
    if offset < 0:
        raise ValueError(f"--calib-offset must be >= 0, got {offset}")
    if spec == "embedded":
        if not tokenizer_spec:
            raise ValueError("the checkpoint records no tokenizer; cannot tokenize the embedded "
                             "corpus (pass a preprocessed --calib-data PREFIX)")
        from megatron.sparse.data.corpus import embedded_articles
        from megatron.sparse.data.tokenizer import load_tokenizer

        from megatron.sparse.eval.datasets import _article_text

        text = "\n\n".join(_article_text(a) for a in embedded_articles("train"))
        stream = tokenize_text(load_tokenizer(tokenizer_spec), text)
        available = stream.numel() // seq_length - offset
        if available < num_samples:
            raise ValueError(f"calibration data 'embedded' has {stream.numel()} tokens = "
                             f"{available + offset} windows of {seq_length}, fewer than "
                             f"--calib-offset {offset} + --calib-samples {num_samples}; lower "
                             f"them or --seq-length")
        start = offset * seq_length
        windows = stream[start:start + num_samples * seq_length].reshape(num_samples, seq_length)
    else:
        if not Path(f"{spec}.idx").is_file() or not Path(f"{spec}.bin").is_file():
            raise FileNotFoundError(f"--calib-data {spec}: no {spec}.bin/.idx (pass 'embedded' or "
                                    f"the prefix written by tools/preprocess_data.py)")
        from megatron.sparse.data.indexed import read_token_windows

        windows = read_token_windows(spec, seq_length, num_windows=num_samples, offset=offset)
        if windows.shape[0] < num_samples:
            raise ValueError(f"calibration data {spec} holds {windows.shape[0]} windows of "
                             f"{seq_length} tokens, fewer than --calib-samples {num_samples}")
    windows = windows.long()
    if vocab_size is not None and windows.numel() and int(windows.max()) >= vocab_size:
        raise ValueError(f"calibration token id {int(windows.max())} is outside the model's "
                         f"vocabulary ({vocab_size}); was the data tokenized for another model?")
    return windows
