"""Run configurations: the flags every training method shares (:class:`RunConfig`), mask
learning's (:class:`TrainConfig`, ``tools/train_mask.py``) and adaptive sparse training's
(:class:`AstConfig`, ``tools/train_ast.py``); one field per flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunConfig:
    """Data, batch, schedule, optimizer, checkpoint, evaluation and logging of any training run."""

    load: str
    """Checkpoint to start from: converted, one-shot pruned, or a training checkpoint to resume."""
    data: str
    """Prefix of the tokenised training data (``PREFIX.bin`` / ``PREFIX.idx``)."""
    save: str | None = None
    """Directory for training checkpoints (resumable) and the final masks."""
    seq_length: int = 4096
    """Tokens per training sequence."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all micro batches and data-parallel ranks."""
    train_iters: int = 2000
    """Optimizer steps."""
    lr: float = 5e-5
    """Peak learning rate (before the logits multiplier)."""
    min_lr: float = 5e-6
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 0
    """Linear warm-up steps."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon. Logit gradients are heavy-tailed (at a SparseGPT prior: median 4e-8, 99.9th
    percentile 4e-4); an epsilon near the top percentiles makes small-gradient groups move in
    proportion to their gradient instead of at the full normalised step."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on the trained parameters."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    ce_weight: float = 1.0
    """Weight of the next-token cross entropy in the loss."""
    kd_weight: float = 0.0
    """Weight of distillation from the dense model (mask learning: the same weights, masks off;
    AST: a frozen dense copy): ``T^2 * KL(p_dense(T) || p_sparse(T))``, mean over tokens; 0
    disables it (no teacher forward)."""
    kd_temperature: float = 2.0
    """Softmax temperature T of the distillation term."""
    save_interval: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end and on preemption)."""
    keep_checkpoints: int = 0
    """Keep only the newest N iteration directories of ``--save`` (each holds the model, the
    logits or weights and their optimizer state); older ones are deleted after a save is
    published. 0 keeps all."""
    eval_interval: int = 0
    """Held-out PPL with the current (argmax or fixed) masks every N steps (0: only at the end)."""
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
    """Seed for logits init, data order and Gumbel noise (mask learning)."""
    exit_after_save: bool = False
    """Exit once the first interval checkpoint is written (tests, time-limited jobs)."""
    override_resume_config: bool = False
    """Resume even if ``seq_length``, ``global_batch_size``, ``data`` or the loss weights and
    temperature differ from the saved run (the run then differs from an uninterrupted one)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """MaskLLM recipe; defaults are the paper's (DESIGN "Mask learning")."""

    prior: str | None = None
    """One-shot checkpoint whose masks initialise the logits (default: ``load`` if it is pruned)."""
    prior_strength: float = 3.0
    """Prior shift in units of the logits' std: ``logits += s * std * (overlap - 1)``."""
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
    logits_lr_mult: float = 10.0
    """Multiplier on ``lr`` for the mask logits."""



@dataclass
class AstConfig(RunConfig):
    """Adaptive sparse training (AST); defaults are the paper's LLaMA-2 7B run (DESIGN "AST")."""

    global_batch_size: int = 128
    """Sequences per optimizer step over all micro batches and data-parallel ranks."""
    train_iters: int = 15000
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate of every trained parameter."""
    min_lr: float = 2e-6
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 500
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on every parameter (the paper's LLaMA run: none)."""
    mask_interval: int = 10
    """Recompute the masks (magnitude 2:4 of the current weights) every N optimizer steps."""
    srste_decay: float = 6e-5
    """SR-STE decay ``lambda_max`` on the pruned weights (0 disables it)."""
    srste_warmup_iters: int = 3000
    """Steps over which the decay ramps linearly from 0 to ``lambda_max`` (0: constant)."""
    srste_mode: str = "adam"
    """Where the decay enters AdamW: "adam" (the paper's: out of the first moment, into the
    second and the update) or "gradient" (added to the loss gradient)."""
    teacher: str | None = None
    """Dense checkpoint of the distillation teacher (default: the dense weights of ``load``)."""
    kd_weight: float = 0.5
    """Weight of distillation from the frozen dense teacher ``T^2 KL(p_teacher(T) ||
    p_student(T))`` (the paper's LLaMA run: CE 1 + KD 0.5; 0: no teacher)."""
    slorb_k: int = 0
    """SLoRB group size k (0: off); it must divide every sparse linear's local input dimension."""
    slorb_train_projection: bool = False
    """Train SLoRB's group-sum projection as well (the paper's LLaMA run: on)."""
