"""Knowledge distillation for 2:4 training: a vocab-parallel KL loss and the teachers.

The training objective is ``ce_weight * CE + kd_weight * T^2 * KL(p_teacher(T) || p_student(T))``,
each term a mean over tokens, ``p(T) = softmax(logits / T)`` (AST paper / thu-ml code: T = 2).
Logits stay vocab-parallel shards ``[batch, seq, vocab / tp]``: the KL all-reduces per-token
maxima and sums over the TP group and never gathers a full vocabulary row.

Teachers:

- :class:`MaskOffTeacher`: the student itself with its masks disabled (mask learning: the frozen
  dense weights, no second copy).
- :class:`FrozenTeacher`: a frozen dense copy of a checkpoint, sharded like the student (AST).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron.sparse import checkpoint as ckpt
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import LlamaArgs, model_forward
from megatron.sparse.parallel import print_rank0


@dataclass
class DistillConfig:
    """Weights of the loss terms and the distillation temperature."""

    ce_weight: float = 1.0
    """Weight of the next-token cross entropy."""
    kd_weight: float = 0.0
    """Weight of the distillation term ``T^2 * KL(p_teacher(T) || p_student(T))``; 0 turns
    distillation off (no teacher forward)."""
    kd_temperature: float = 2.0
    """Softmax temperature ``T`` of teacher and student in the distillation term."""

    def __post_init__(self):
        for name in ("ce_weight", "kd_weight", "kd_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, "
                                 f"got {value}")
        for name in ("ce_weight", "kd_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("--ce-weight and --kd-weight are both 0: the loss would be zero; "
                             "give one of them a positive weight")
        if self.kd_temperature <= 0:
            raise ValueError(f"--kd-temperature must be > 0, got {self.kd_temperature}")

    @property
    def enabled(self) -> bool:
        """Whether the loss has a distillation term (a teacher forward is needed)."""
        return self.kd_weight > 0

    @classmethod
    def from_config(cls, cfg) -> "DistillConfig":
        """The distillation fields of a run config (e.g. ``TrainConfig``) that has them all."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def _resolve_group(tp_group):
    if tp_group is not None:
        return tp_group
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _all_reduce(t: torch.Tensor, group, op) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


_CHUNK_ELEMENTS = 1 << 22
"""Logits per temporary buffer of the KL (16 MiB in fp32): the full-size memory is one buffer."""


class _VocabParallelKL(torch.autograd.Function):
    """Per-token ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over vocab shards; gradient to ``s``.

    With ``a = s/T - max``, ``b = t/T - max`` (global maxima), ``Z_a = sum exp(a)``,
    ``Z_b = sum exp(b)`` and ``C = sum exp(b) (b - a)`` (all sums all-reduced over the group):
    ``KL = C / Z_b - log Z_b + log Z_a``. Its gradient is ``T (p_s - p_t)`` per logit, local to
    each shard (the per-token result is replicated on every rank), so backward needs no
    communication. Rows are processed in chunks; the only full-size buffer is that difference,
    saved for backward.
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        work = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype),
                                   torch.float32)  # fp32 at least (fp64 kept)
        vocab = student.shape[-1]
        s, t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        spans = [slice(lo, lo + step) for lo in range(0, s.shape[0], step)]

        def scaled(x, row, span):  # x/T - max for one chunk, a fresh buffer
            return x[span].to(work).div(temperature).sub_(maxima[row, span, None])

        # division by T > 0 is monotonic: max(x / T) == max(x) / T exactly
        maxima = torch.stack([s.amax(dim=-1).to(work), t.amax(dim=-1).to(work)]).div_(temperature)
        _all_reduce(maxima, group, dist.ReduceOp.MAX)
        diff = torch.empty(s.shape, dtype=work, device=s.device)  # exp(a), then p_s - p_t
        sums = torch.empty((3, s.shape[0]), dtype=work, device=s.device)
        for span in spans:
            a, b = scaled(s, 0, span), scaled(t, 1, span)
            sums[0, span] = torch.exp(a, out=diff[span]).sum(dim=-1)
            a.neg_().add_(b)  # b - a
            b.exp_()
            sums[1, span] = b.sum(dim=-1)
            sums[2, span] = torch.linalg.vecdot(b, a, dim=-1)
        _all_reduce(sums, group, dist.ReduceOp.SUM)
        z_s, z_t, cross = sums
        kl = cross / z_t + z_s.log() - z_t.log()
        for span in spans:
            p_t = scaled(t, 1, span).exp_().div_(z_t[span, None])
            diff[span].div_(z_s[span, None]).sub_(p_t)
        ctx.save_for_backward(diff)
        ctx.temperature = temperature
        ctx.dtype = student.dtype
        return (kl * temperature**2).reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        (diff,) = ctx.saved_tensors
        scale = (grad_output.to(diff.dtype) * ctx.temperature).reshape(-1, 1)
        grad = (diff * scale).reshape(*grad_output.shape, diff.shape[-1])
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float, tp_group=None) -> torch.Tensor:
    """Per-token ``T^2 * KL(p_teacher(T) || p_student(T))`` ``[batch, seq]`` from vocab shards.

    Both logits are this rank's ``[..., vocab / tp]`` shard of the same vocabulary range;
    ``tp_group`` defaults to megatron's tensor-parallel group (none: one process). Gradients
    flow to the student only; the teacher is treated as a constant.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; distil from a teacher "
                         f"with the same vocabulary and TP size")
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(temperature),
                                  _resolve_group(tp_group))


def _token_mean(per_token: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    per_token = per_token.float()
    if loss_mask is None:
        return per_token.mean()
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _weighted(ce_per_token: torch.Tensor, kd_per_token: torch.Tensor | None, cfg: DistillConfig,
              loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = _token_mean(ce_per_token, loss_mask)
    loss = ce * cfg.ce_weight
    parts = {"ce": ce.detach()}
    if kd_per_token is not None:
        kd = _token_mean(kd_per_token, loss_mask)
        loss = loss + kd * cfg.kd_weight
        parts["kd"] = kd.detach()
    return loss, parts


def combined_loss(ce_per_token: torch.Tensor, student_logits: torch.Tensor | None,
                  teacher_logits: torch.Tensor | None, cfg: DistillConfig,
                  loss_mask: torch.Tensor | None = None,
                  tp_group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight * mean(CE) + kd_weight * mean(T^2 KL)`` over the (masked) tokens.

    Returns the loss and its detached parts ``{"ce": ..., "kd": ...}`` (``kd`` only when
    ``cfg.kd_weight > 0``; then both logits are needed).
    """
    kd = None
    if cfg.enabled:
        if student_logits is None or teacher_logits is None:
            raise ValueError("a distillation loss (kd_weight > 0) needs student and teacher "
                             "logits")
        kd = vocab_parallel_kl(student_logits, teacher_logits, temperature=cfg.kd_temperature,
                               tp_group=tp_group)
    return _weighted(ce_per_token, kd, cfg, loss_mask)


def student_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                 cfg: DistillConfig, teacher=None,
                 loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One micro batch's loss: teacher forward (if distilling), then ONE student forward.

    Without distillation this is ``ce_weight * mean(model_forward(model, tokens, labels))``,
    the trainer's plain loss. With it the student's vocab-parallel logits feed both the KL and
    megatron-core's ``vocab_parallel_cross_entropy`` (the same CE ``model_forward`` computes).
    """
    if not cfg.enabled:
        return _weighted(model_forward(model, tokens, labels), None, cfg, loss_mask)
    if teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher (MaskOffTeacher or FrozenTeacher)")
    teacher_logits = teacher.logits(tokens)
    logits = model_forward(model, tokens)
    kd = vocab_parallel_kl(logits, teacher_logits, temperature=cfg.kd_temperature)
    del teacher_logits
    # megatron's CE shifts an fp32 input in place; the KL kept only its own buffer, so the
    # logits need no copy, but the KL must come first
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    return _weighted(ce, kd, cfg, loss_mask)


class MaskOffTeacher:
    """The student with every sparse layer's mask disabled: its own dense weights, no copy.

    ``logits`` runs under ``no_grad`` and restores each layer's ``MaskState.enabled``; a
    disabled mask draws no sample, so the student's noise and regulariser state are untouched.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[batch, seq, vocab / tp]`` of the dense (mask-off) model."""
        layers = sparse_layers(self.model)
        saved = [layer.mask_state.enabled for _, layer in layers]
        set_mask_state(self.model, enabled=False)
        try:
            return model_forward(self.model, tokens)
        finally:
            for (_, layer), enabled in zip(layers, saved):
                layer.mask_state.enabled = enabled


def mask_off_teacher(model: torch.nn.Module, cfg: DistillConfig,
                     meta: dict) -> MaskOffTeacher | None:
    """The mask-learning teacher of a run loaded from a checkpoint with ``meta``; None without
    distillation. Weights updated by one-shot pruning are not the dense model: say so."""
    if not cfg.enabled:
        return None
    if meta.get("weights_updated"):
        print_rank0("note: --load holds weights updated by one-shot pruning, so the mask-off "
                    "teacher is not the dense model; load the dense checkpoint and pass the "
                    "pruned one as --prior")
    return MaskOffTeacher(model)


def check_teacher(teacher: LlamaArgs, student: LlamaArgs, source: str | Path) -> None:
    """One-line ValueError when ``teacher`` is another vocabulary or model than ``student``."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher {source} has a vocabulary of {teacher.vocab_size} tokens, the "
                         f"student {student.vocab_size}; distil from a checkpoint of the same "
                         f"model and tokenizer")
    if not ckpt.same_model(teacher.to_dict(), student.to_dict()):
        raise ValueError(f"teacher {source} is a checkpoint of another model (hidden "
                         f"{teacher.hidden_size}, {teacher.num_layers} layers vs hidden "
                         f"{student.hidden_size}, {student.num_layers} layers); distil from the "
                         f"dense checkpoint of the student's model")


class FrozenTeacher:
    """A frozen dense model sharded over the current TP group like the student."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, load_dir: str | Path, *, like: LlamaArgs,
                        params_dtype: torch.dtype = torch.float32,
                        device=None) -> "FrozenTeacher":
        """Load the weights of ``load_dir`` as a dense model (its masks, if any, are ignored).

        ``like`` is the student's architecture; another model or vocabulary is a one-line
        error before anything is built.
        """
        check_teacher(ckpt.read_model_args(load_dir), like, load_dir)
        model, _ = ckpt.load_model(load_dir, mask_kind="dense", with_masks=False,
                                   params_dtype=params_dtype, device=device)
        return cls(model)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[batch, seq, vocab / tp]`` of the teacher."""
        return model_forward(self.model, tokens)
