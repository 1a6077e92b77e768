"""What a training method adds to the one loop (train/loop.py), and mask learning (MaskLLM).

A method chooses the sparse layers' mask kind, the trained parameters and their optimizer, the
per-step schedule, the loss of a micro batch, what happens at a step boundary, the scalars of a
log window and what its checkpoints carry besides the model. :class:`MaskLearning` trains the
2:4 mask logits of frozen weights; :mod:`megatron.sparse.train.ast` trains the weights.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse import mask as mask_ops
from megatron.sparse.convert.sharding import full_shape, shard_tensor
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import LlamaArgs
from megatron.sparse.parallel import print_rank0
from megatron.sparse.train import schedules
from megatron.sparse.train.collectives import all_reduce, tp_group
from megatron.sparse.train.config import TrainConfig
from megatron.sparse.train.distill import mask_off_teacher, student_loss

if TYPE_CHECKING:
    from megatron.sparse.train.loop import Trainer


class TrainingMethod:
    """The hooks of the training loop; the defaults do nothing."""

    name: str
    """The run tag's ``method`` and the checkpoint's ``mask_source``."""
    mask_kind: str
    """The sparse layers' mask kind while training."""
    eval_note: str = ""
    """How the evaluation's masks are chosen (printed with the PPL)."""

    def setup(self, trainer: "Trainer", resume_dir: Path | None) -> None:
        """Set ``self.params`` and ``self.optimizer``; fresh masks (``resume_dir`` None) or the
        method's own state of a resumed checkpoint (the loop restores the optimizer after)."""
        raise NotImplementedError

    def schedule(self, step: int) -> dict[str, float]:
        """Set this step's learning rates (and mask state); returns the scheduled values."""
        raise NotImplementedError

    def micro_loss(self, tokens: torch.Tensor, labels: torch.Tensor, *, step: int,
                   global_micro: int, n_micro: int,
                   values: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to backpropagate, its detached parts {"ce": ..., "kd": ...})`` of one micro
        batch (train/distill.py ``student_loss``, divided by ``n_micro``)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called once ``step`` optimizer steps are done (a step boundary)."""

    def step_scalars(self) -> dict[str, float]:
        """Scalars of the last step besides loss, lr and the gradient norm."""
        return {}

    def window_scalars(self) -> dict[str, float]:
        """Scalars of a log window (called at every log step)."""
        return {}

    def write_state(self, directory: Path) -> None:
        """Add the method's own resumable state to a checkpoint iteration (every rank)."""

    def checkpoint_meta(self) -> dict:
        """Entries of ``model_args.json`` besides the run tag."""
        return {}


@torch.no_grad()
def init_logits(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.01) logits drawn per *unsharded* layer, so every TP size starts identically."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, layer in sparse_layers(model):
        key = f"{name}.mask_logits"
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        full = torch.randn(full_shape(key, tuple(layer.mask_logits.shape), tp), generator=gen)
        layer.mask_logits.copy_(shard_tensor(key, full * mask_ops.LOGITS_INIT_STD, tp)[rank])


def apply_prior(model: torch.nn.Module, prior_dir: str, args: LlamaArgs, strength: float) -> None:
    """Shift the logits toward the masks stored in a one-shot, imported or trained checkpoint.

    Fixed masks are used as they are, stored logits through their argmax.
    """
    prior_args = ckpt.read_model_args(prior_dir)
    if not ckpt.same_model(prior_args.to_dict(), args.to_dict()):
        raise ValueError(f"--prior {prior_dir} is a checkpoint of another model (hidden "
                         f"{prior_args.hidden_size}, {prior_args.num_layers} layers vs hidden "
                         f"{args.hidden_size}, {args.num_layers} layers); use a prior of this model")
    choices = ckpt.load_mask_choices(prior_dir, model)
    with torch.no_grad():
        for name, layer in sparse_layers(model):
            layer.set_mask_prior(mask_ops.candidates_to_mask(choices.pop(name)), strength)


@torch.no_grad()
def argmax_snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.mask_choices().clone() for _, layer in sparse_layers(model)]


def changed_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Fraction of all groups (over TP shards) whose candidate changed."""
    counts = torch.tensor([sum(int((a != b).sum()) for a, b in zip(before, after)),
                           sum(a.numel() for a in after)], dtype=torch.float64)
    all_reduce(counts, tp_group())
    return float(counts[0] / counts[1])


class MaskLearning(TrainingMethod):
    """MaskLLM: frozen weights, AdamW on the 2:4 mask logits (Gumbel-softmax masks)."""

    name = "maskllm"
    mask_kind = "logits"
    eval_note = " (argmax masks)"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.previous: list[torch.Tensor] | None = None

    def setup(self, trainer: "Trainer", resume_dir: Path | None) -> None:
        cfg, model = self.cfg, trainer.model
        self.trainer = trainer
        self.teacher = mask_off_teacher(model, trainer.distill, trainer.meta)
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = [layer.mask_logits for _, layer in sparse_layers(model)]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.params, "lr": cfg.lr * cfg.logits_lr_mult}],
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay)
        if resume_dir is not None:
            ckpt.load_masks(trainer.source, model)
        else:
            self._fresh_logits()
        self.previous = argmax_snapshot(model)

    def _fresh_logits(self) -> None:
        """Logits at the start of a run: N(0, 0.01) shifted toward the prior's masks, if any.

        The prior is ``--prior``, else the masks of ``--load``. An imported prior (``mask_role``
        "prior", tools/import_masks.py --as-prior) brings its own strength and init seed.
        """
        cfg, meta, model = self.cfg, self.trainer.meta, self.trainer.model
        if meta.get("logits_are_init") and cfg.prior is None:  # format 1: baked prior logits
            ckpt.load_masks(cfg.load, model)
            print_rank0(f"prior: the logits stored in {cfg.load} (an imported prior)")
            return
        prior, strength, seed = cfg.prior, cfg.prior_strength, cfg.seed
        if prior is None and ckpt.has_masks(meta):
            prior = cfg.load
            if meta.get("mask_role") == "prior":
                strength = float(meta.get("prior_strength", strength))
                seed = int(meta.get("prior_seed", seed))
        init_logits(model, seed)
        if prior is not None:
            print_rank0(f"prior: masks of {prior} at strength {strength}")
            apply_prior(model, prior, self.trainer.args, strength)
        else:
            print_rank0("prior: none (logits start from N(0, 0.01))")

    def schedule(self, step: int) -> dict[str, float]:
        cfg, total = self.cfg, self.cfg.train_iters
        values = {
            "lr": schedules.warmup_cosine(step, peak=cfg.lr, minimum=cfg.min_lr,
                                          warmup=cfg.warmup_iters, total=total),
            "tau": schedules.linear(cfg.tau_start, cfg.tau_end, step, total),
            "kappa": schedules.linear(cfg.kappa_start, cfg.kappa_end, step, total),
            "reg_lambda": schedules.regulariser_weight(step, lam=cfg.reg_lambda, total=total),
        }
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"] * cfg.logits_lr_mult
        set_mask_state(self.trainer.model, tau=values["tau"], kappa=values["kappa"],
                       hard=cfg.hard, noise=cfg.gumbel_noise)
        self._reg = torch.zeros(1)
        return values

    def micro_loss(self, tokens, labels, *, step, global_micro, n_micro, values):
        model = self.trainer.model
        # Noise of global micro batch (micro * DP + dp_rank): the same at every TP x DP layout.
        set_mask_state(model, noise_seed=mask_ops.combine_seeds(self.cfg.seed, step,
                                                                global_micro))
        objective, parts = student_loss(model, tokens, labels, self.trainer.distill, self.teacher)
        loss = objective / n_micro
        if values["reg_lambda"] > 0:
            self._reg = sum(layer.sparse_weight_norm_sq() for _, layer in sparse_layers(model))
            loss = loss - values["reg_lambda"] * self._reg / n_micro
        return loss, parts

    def step_scalars(self) -> dict[str, float]:
        reg_total = all_reduce(self._reg.detach().reshape(1).double(), tp_group())
        return {"reg": float(reg_total)}

    def window_scalars(self) -> dict[str, float]:
        now = argmax_snapshot(self.trainer.model)
        changed = changed_fraction(self.previous, now)
        self.previous = now
        return {"changed": changed}
