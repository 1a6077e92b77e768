"""Training batches from a megatron ``.bin/.idx`` corpus through ``GPTDataset``.

The sample order is a pure function of ``(seed, step)``: step ``t`` uses global samples
``[t * G, (t + 1) * G)``; micro batch ``m`` on data-parallel rank ``r`` takes
``m * mbs * dp + r * mbs + [0, mbs)`` of those. Resuming at a step therefore resumes the data
position exactly, whatever happened before.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron.sparse.data.validate import check_indexed


class _TokenIds:
    """What GPTDataset reads from a tokenizer. With reset_position_ids, reset_attention_mask and
    eod_mask_loss off it never uses ``eod``; ``pad=-1`` (megatron-core's own "no padding" id)
    means no token is treated as padding. ``eod`` is a different sentinel: megatron-core warns
    at every dataset build when the pad id equals another special id."""

    def __init__(self, *, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = -2
        self.pad = -1
        self.unique_identifiers = {"class": "megatron-sparse-token-ids", "vocab_size": vocab_size}


def count_tokens(prefix: str) -> int:
    """Total tokens in a ``.bin/.idx`` corpus, after validating it (one-line error if damaged)."""
    return check_indexed(prefix).tokens


class TrainBatches:
    """Deterministic micro batches of ``[mbs, seq]`` tokens and labels for one DP rank."""

    def __init__(self, *, prefix: str, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, train_iters: int, seed: int, vocab_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step != 0:
            raise ValueError(f"--global-batch-size {global_batch_size} is not divisible by "
                             f"--micro-batch-size x data-parallel size ({micro_batch_size} x "
                             f"{dp_size} = {per_step})")
        needed = global_batch_size * (seq_length + 1)
        available = count_tokens(prefix)
        if available < needed:
            raise ValueError(f"{prefix} holds {available} tokens, fewer than one global batch needs "
                             f"({global_batch_size} x {seq_length + 1} = {needed}); use more data or "
                             f"a smaller --global-batch-size / --seq-length")
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.num_micro_batches = global_batch_size // per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, path_to_cache=None,
            tokenizer=_TokenIds(vocab_size=vocab_size),
        )
        quiet = logging.getLogger("megatron.core.datasets")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            self.dataset = BlendedMegatronDatasetBuilder(
                GPTDataset, [global_batch_size * train_iters, None, None], lambda: True, config
            ).build()[0]
        finally:
            quiet.setLevel(level)

    def micro_batches(self, step: int):
        """Yield ``(tokens, labels)`` LongTensors ``[mbs, seq]`` of step ``step`` for this rank."""
        base = step * self.global_batch_size
        for m in range(self.num_micro_batches):
            start = base + m * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
            samples = [self.dataset[start + j] for j in range(self.micro_batch_size)]
            yield (torch.stack([s["tokens"] for s in samples]),
                   torch.stack([s["labels"] for s in samples]))
