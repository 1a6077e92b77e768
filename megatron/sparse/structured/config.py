"""Configuration of a structural-pruning run (one field per ``tools/prune_structured.py`` flag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StructConfig:
    """Policy-gradient structural pruning; defaults follow the public code where it applies."""

    load: str
    """Dense (converted) megatron-sparse checkpoint."""
    calib_data: str
    """'embedded' or the prefix of a tokenised .bin/.idx dataset: Wanda-sp init and learning."""
    keep_ratio: float
    """Fraction of the attention + MLP parameters to keep, in (0, 1]."""
    save: str | None = None
    """Output directory: unit masks, learning state (resumable), metrics, summary."""
    slice: bool = True
    """Also write the physically smaller (sliced) checkpoint into --save (needs a dense --load)."""
    units: str = "channels,heads"
    """Comma-separated pruned units: channels (MLP), heads (KV groups), blocks (whole blocks)."""
    init: str = "wanda-sp"
    """Initial keep-probabilities: wanda-sp (structured Wanda metric) or uniform."""
    steps: int = 60
    """Policy-gradient steps; 0 keeps the init (metric-only baseline)."""
    samples_per_step: int = 2
    """Masks sampled per step on the same batch (K)."""
    lr: float = 0.02
    """Peak learning rate of the plain SGD update on the probabilities (cosine decay)."""
    heads_lr: float | None = 0.3
    """Peak learning rate of the KV-group pool (None: --lr); few units with large effects."""
    min_lr_fraction: float = 0.0
    """Learning rate at the last step, as a fraction of the peak (cosine decay)."""
    estimator: str = "normalized"
    """Gradient estimate: normalized ((m-s)/sqrt(s(1-s)), public code) or score ((m-s)/(s(1-s)))."""
    baseline: str = "batch"
    """Loss baseline: batch (the mean of this step's K losses on the same batch; with the 1/(K-1)
    factor the leave-one-out estimate) or moving (moving average over steps, the public code's)."""
    baseline_alpha: float = 0.2
    """Moving-average rate of the moving baseline."""
    seq_length: int = 128
    """Tokens per learning sequence."""
    batch_size: int = 4
    """Sequences per step (shared by the K samples)."""
    micro_batch_size: int = 4
    """Sequences per forward pass."""
    calib_samples: int = 32
    """Calibration sequences for the Wanda-sp init."""
    calib_seq_length: int = 256
    """Tokens per calibration sequence."""
    block_keep: float = 0.9
    """Fraction of the 2 x num_layers attention / MLP blocks kept when blocks is a unit."""
    channel_multiple: int = 32
    """Kept MLP width per layer is a multiple of this (4 x TP keeps 2:4 pruning valid at TP)."""
    group_multiple: int = 1
    """Kept KV groups per layer is a multiple of this (the TP size the result will run at)."""
    seed: int = 1234
    """Seed of the data order and of the counter-based mask samples."""
    log_interval: int = 1
    """Steps between progress lines."""
    save_interval: int = 10
    """Steps between learning-state saves (and at the end)."""
    tensorboard_dir: str | None = None
    """TensorBoard directory (default: SAVE/tensorboard)."""
    eval_data: str | None = None
    """Evaluate the final masked model on this held-out data (embedded, wikitext2, a file)."""
    eval_seq_length: int = 256
    """Evaluation window length."""
    eval_windows: int = 40
    """Evaluation windows (evenly spaced)."""

    def to_dict(self) -> dict:
        return asdict(self)
