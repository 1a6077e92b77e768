"""Adaptive sparse training (AST): trainable weights under a magnitude 2:4 mask that follows them.

The forward uses ``W~ = M * W`` with ``M`` the magnitude 2:4 mask of the current weights (groups
of 4 input columns, as every sparse layer), stored as the layers' fixed ``mask_choice`` and
recomputed every ``mask_interval`` optimizer steps, at step boundaries only. The backward is
straight-through (the gradient of ``W~`` reaches every weight, pruned ones included) and the
pruned weights get the annealed SR-STE decay ``lambda(t) = lambda_max * min(1, t / T0)``
(train/srste.py). A run starts from a dense checkpoint (magnitude masks of its weights) or a
pruned one (its masks); its checkpoints are ordinary fixed-mask checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse import mask as mask_ops
from megatron.sparse import slorb
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.parallel import print_rank0
from megatron.sparse.prune.magnitude import magnitude_mask
from megatron.sparse.train import schedules
from megatron.sparse.train.collectives import all_reduce, tp_group
from megatron.sparse.train.config import AstConfig
from megatron.sparse.train.distill import FrozenTeacher, student_loss
from megatron.sparse.train.methods import TrainingMethod, argmax_snapshot
from megatron.sparse.train.srste import SRSTE_MODES, SRSTEAdamW

if TYPE_CHECKING:
    from megatron.sparse.train.loop import Trainer

INIT_MASKS_DIR = "ast_init_masks"
"""Per-TP-rank file of the run's initial masks in a checkpoint iteration (for the flip rate)."""


def check_ast_config(cfg: AstConfig) -> None:
    """One-line ValueErrors for AST settings that cannot run."""
    if cfg.mask_interval <= 0:
        raise ValueError(f"--mask-interval {cfg.mask_interval}: the masks must be recomputed "
                         f"every N >= 1 steps (the paper: 10)")
    if cfg.srste_mode not in SRSTE_MODES:
        raise ValueError(f"--srste-mode {cfg.srste_mode!r}: choose one of {', '.join(SRSTE_MODES)}")
    if cfg.srste_decay < 0 or cfg.srste_warmup_iters < 0:
        raise ValueError("--srste-decay and --srste-warmup-iters must be >= 0")
    if cfg.slorb_k < 0:
        raise ValueError(f"--slorb-k {cfg.slorb_k}: use 0 (off) or a group size >= 1")


def srste_decay(step: int, *, decay: float, warmup: int) -> float:
    """``lambda(t) = lambda_max * min(1, t / T0)`` at 0-based step ``t`` (``T0 = 0``: constant)."""
    return decay if warmup <= 0 else decay * min(1.0, step / warmup)


@torch.no_grad()
def magnitude_choices(layer) -> torch.Tensor:
    """uint8 ``[rows, in/4]`` candidates of the magnitude 2:4 mask of a layer's local weight."""
    kept = magnitude_mask(weight=layer.weight)
    return mask_ops.mask_to_candidates(mask_ops.weight_to_groups(kept)).to(torch.uint8)


def flipped_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Fraction of all weights (over TP shards) whose kept/pruned state differs."""
    flipped, total = 0, 0
    for a, b in zip(before, after):
        flipped += int((mask_ops.candidates_to_mask(a) != mask_ops.candidates_to_mask(b)).sum())
        total += a.numel() * mask_ops.GROUP_SIZE
    counts = all_reduce(torch.tensor([flipped, total], dtype=torch.float64), tp_group())
    return float(counts[0] / counts[1])


class AdaptiveSparseTraining(TrainingMethod):
    """AST: all parameters train; sparse weights under straight-through magnitude masks."""

    name = "ast"
    mask_kind = "fixed"
    eval_note = " (magnitude 2:4 masks)"

    def __init__(self, cfg: AstConfig):
        check_ast_config(cfg)
        self.cfg = cfg

    def setup(self, trainer: "Trainer", resume_dir: Path | None) -> None:
        cfg, model = self.cfg, trainer.model
        self.trainer = trainer
        self.layers = [layer for _, layer in sparse_layers(model)]
        set_mask_state(model, straight_through=True)
        for p in model.parameters():
            p.requires_grad_(True)
        if resume_dir is not None:
            ckpt.load_masks(trainer.source, model)
            self.initial = self._read_initial(resume_dir)
        else:
            if ckpt.has_masks(trainer.meta):
                ckpt.load_masks(cfg.load, model)
                print_rank0(f"masks: those of {cfg.load}, then magnitude every "
                            f"{cfg.mask_interval} steps")
            else:
                self.update_masks()
                print_rank0(f"masks: magnitude 2:4 of {cfg.load}, recomputed every "
                            f"{cfg.mask_interval} steps")
            self.initial = argmax_snapshot(model)
        self.previous = argmax_snapshot(model)
        self._attach_slorb()
        self.teacher = self._teacher() if trainer.distill.enabled else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        sparse_weight = {id(layer.weight): layer for layer in self.layers}

        def pruned_mask(p: torch.Tensor) -> torch.Tensor | None:
            layer = sparse_weight.get(id(p))
            return None if layer is None else ~layer.eval_mask()

        self.optimizer = SRSTEAdamW(
            [{"params": self.params}], pruned_mask=pruned_mask, lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, mode=cfg.srste_mode)

    def _attach_slorb(self) -> None:
        """SLoRB branches (``--slorb-k``), initialised from the starting weights and masks; a
        resumed run (or a SLoRB checkpoint as ``--load``) already has its own."""
        cfg, model = self.cfg, self.trainer.model
        have = slorb.slorb_config(model)
        if have is not None:
            if cfg.slorb_k and cfg.slorb_k != have["k"]:
                raise ValueError(f"--slorb-k {cfg.slorb_k}: {self.trainer.source} carries SLoRB "
                                 f"with k={have['k']}; use --slorb-k {have['k']}")
            return
        if cfg.slorb_k:
            slorb.attach_slorb(model, k=cfg.slorb_k, train_projection=cfg.slorb_train_projection)
            print_rank0(f"SLoRB: k={cfg.slorb_k}, projection "
                        f"{'trained' if cfg.slorb_train_projection else 'fixed'}")

    def _teacher(self) -> FrozenTeacher:
        """The frozen dense teacher: ``--teacher``, else the dense weights ``--load`` came from
        (itself when it is a conversion, its ``base_checkpoint`` when it is pruned)."""
        trainer, cfg = self.trainer, self.cfg
        source = cfg.teacher
        if source is None:
            meta = ckpt.read_checkpoint_meta(cfg.load)
            source = meta.get("base_checkpoint", cfg.load) if ckpt.has_masks(meta) else cfg.load
        print_rank0(f"teacher: frozen dense weights of {source} (KD weight {cfg.kd_weight}, "
                    f"T {cfg.kd_temperature})")
        return FrozenTeacher.from_checkpoint(source, like=trainer.args, device=trainer.device)

    @torch.no_grad()
    def update_masks(self) -> None:
        """Every sparse layer's mask := magnitude 2:4 of its current weight."""
        for layer in self.layers:
            layer.set_mask_choice(magnitude_choices(layer))

    def schedule(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        values = {
            "lr": schedules.warmup_cosine(step, peak=cfg.lr, minimum=cfg.min_lr,
                                          warmup=cfg.warmup_iters, total=cfg.train_iters),
            "srste_decay": srste_decay(step, decay=cfg.srste_decay, warmup=cfg.srste_warmup_iters),
        }
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            group["srste_decay"] = values["srste_decay"]
        return values

    def micro_loss(self, tokens, labels, *, step, global_micro, n_micro, values):
        objective, parts = student_loss(self.trainer.model, tokens, labels, self.trainer.distill,
                                        self.teacher)
        return objective / n_micro, parts

    def after_step(self, step: int) -> None:
        if step % self.cfg.mask_interval == 0:
            self.update_masks()

    def window_scalars(self) -> dict[str, float]:
        now = argmax_snapshot(self.trainer.model)
        values = {"mask_flip": flipped_fraction(self.previous, now),
                  "mask_flip_init": flipped_fraction(self.initial, now)}
        self.previous = now
        return values

    # -- the run's initial masks, beside the optimizer state --------------------------------------
    def _initial_path(self, directory: Path) -> Path:
        rank = parallel_state.get_tensor_model_parallel_rank()
        return Path(directory) / INIT_MASKS_DIR / f"tp_{rank:02d}.pt"

    def write_state(self, directory: Path) -> None:
        if parallel_state.get_data_parallel_rank() == 0:
            path = self._initial_path(directory)
            path.parent.mkdir(exist_ok=True)
            torch.save(self.initial, path)

    def _read_initial(self, directory: Path) -> list[torch.Tensor]:
        return torch.load(self._initial_path(directory), weights_only=True)
