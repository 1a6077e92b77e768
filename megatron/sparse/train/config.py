"""Configuration of a mask-learning run (one field per ``tools/train_mask.py`` flag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    """MaskLLM recipe; defaults are the paper's (DESIGN "Mask learning")."""

    load: str
    """Checkpoint to start from: converted, one-shot pruned, or a training checkpoint to resume."""
    data: str
    """Prefix of the tokenised training data (``PREFIX.bin`` / ``PREFIX.idx``)."""
    save: str | None = None
    """Directory for training checkpoints (resumable) and the final masks."""
    prior: str | None = None
    """One-shot checkpoint whose masks initialise the logits (default: ``load`` if it is pruned)."""
    prior_strength: float = 3.0
    """Prior shift in units of the logits' std: ``logits += s * std * (overlap - 1)``."""
    seq_length: int = 4096
    """Tokens per training sequence."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all micro batches and data-parallel ranks."""
    train_iters: int = 2000
    """Optimizer steps."""
    tau_start: float = 4.0
    """Gumbel-softmax temperature at step 0 (annealed linearly)."""
    tau_end: float = 0.05
    """Temperature at the last step."""
    kappa_start: float = 100.0
    """Logit scaling at step 0 (annealed linearly)."""
    kappa_end: float = 500.0
    """Logit scaling at the last step."""
    hard: bool = False
    """Straight-through hard masks instead of soft ones."""
    gumbel_noise: bool = True
    """Sample Gumbel noise; off gives the deterministic soft masks ``softmax(kappa l / tau)``."""
    reg_lambda: float = 1e-5
    """Sparse-weight regulariser weight; decays linearly to 0 over training."""
    lr: float = 5e-5
    """Peak learning rate (before the logits multiplier)."""
    min_lr: float = 5e-6
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 0
    """Linear warm-up steps."""
    logits_lr_mult: float = 10.0
    """Multiplier on ``lr`` for the mask logits."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon. Logit gradients are heavy-tailed (at a SparseGPT prior: median 4e-8, 99.9th
    percentile 4e-4); an epsilon near the top percentiles makes small-gradient groups move in
    proportion to their gradient instead of at the full normalised step."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on the logits."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    save_interval: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end and on preemption)."""
    eval_interval: int = 0
    """Held-out PPL with argmax masks every N steps (0: only at the end)."""
    eval_data: str | None = None
    """Held-out text as in ``tools/eval_ppl.py --data``: embedded, python-stdlib, wikitext2 or a
    text file."""
    eval_windows: int = 16
    """Held-out windows of ``seq_length`` tokens per evaluation, evenly spaced over the text."""
    log_interval: int = 1
    """Progress line and scalars every N steps."""
    tensorboard_dir: str | None = None
    """tensorboardX log directory (default: ``<save>/tensorboard``)."""
    wandb_project: str | None = None
    """Log to Weights & Biases as well (``WANDB_MODE=offline`` works)."""
    seed: int = 1234
    """Seed for logits init, data order and Gumbel noise."""
    exit_after_save: bool = False
    """Exit once the first interval checkpoint is written (tests, time-limited jobs)."""
    override_resume_config: bool = False
    """Resume even if ``seq_length``, ``global_batch_size`` or ``data`` differ from the saved run
    (the data order then differs from an uninterrupted run)."""

    def to_dict(self) -> dict:
        return asdict(self)
