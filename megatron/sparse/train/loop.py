"""The mask-learning loop: frozen weights, AdamW on the 2:4 mask logits only.

Runs under torchrun with TP x DP ranks (gloo on CPU, nccl on GPU): TP shards the model, DP splits
each global batch and averages the logits' gradients. Resumable from interval checkpoints and
from the checkpoint written on SIGTERM/SIGUSR1 (Slurm preemption).
"""

from __future__ import annotations

import signal
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse import mask as mask_ops
from megatron.sparse.compat import default_device
from megatron.sparse.convert.sharding import full_shape, shard_tensor
from megatron.sparse.eval.perplexity import megatron_perplexity
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.model import LlamaArgs
from megatron.sparse.parallel import is_main, print_rank0
from megatron.sparse.train import schedules
from megatron.sparse.train.config import TrainConfig
from megatron.sparse.train.data import TrainBatches
from megatron.sparse.train.distill import DistillConfig, mask_off_teacher, student_loss
from megatron.sparse.train.metrics import HISTORY_FILE, MetricsLogger
from megatron.sparse.train.state import (
    check_resume, read_train_state, restore_train_state, run_tag, saved_run, write_train_state,
)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; checked (and agreed on by all ranks) after each step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0])
        return bool(_all_reduce(flag, None, op=dist.ReduceOp.MAX).item())


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group``; CPU tensors go through the GPU under NCCL."""
    if not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return t
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        staged = t.to(default_device())
        dist.all_reduce(staged, op=op, group=group)
        return t.copy_(staged)
    dist.all_reduce(t, op=op, group=group)
    return t


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


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the logits' gradients (TP shards summed, DP replicas identical)."""
    local = torch.zeros(1, dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            local += p.grad.double().pow(2).sum()
    return _all_reduce(local, _tp_group()).sqrt()


@torch.no_grad()
def argmax_snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [mask_ops.argmax_candidates(layer.mask_logits).to(torch.uint8)
            for _, layer in sparse_layers(model)]


def changed_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Fraction of all groups (over TP shards) whose argmax candidate changed."""
    counts = torch.tensor([sum(int((a != b).sum()) for a, b in zip(before, after)),
                           sum(a.numel() for a in after)], dtype=torch.float64)
    _all_reduce(counts, _tp_group())
    return float(counts[0] / counts[1])


class MaskTrainer:
    """Builds the run from a :class:`TrainConfig` and trains the mask logits."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.distill = DistillConfig.from_config(cfg)  # validated before anything is read
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.dp = parallel_state.get_data_parallel_world_size()
        resume_root = self._resume_root()
        source = resume_root or cfg.load
        self.meta = ckpt.read_checkpoint_meta(source)
        self.args = LlamaArgs.from_dict(self.meta["model"])
        self.device = default_device()
        self.model = self.args.build(mask_kind="logits", device=self.device)
        print_rank0(f"loading {source} at TP={self.tp} x DP={self.dp}")
        ckpt.load_into(source, self.model, masks=False)
        self.teacher = mask_off_teacher(self.model, self.distill, self.meta)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.logits = [layer.mask_logits for _, layer in sparse_layers(self.model)]
        for p in self.logits:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.logits, "lr": cfg.lr * cfg.logits_lr_mult}],
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay)
        self.step = 0
        if resume_root:
            directory = ckpt.resolve_iteration(resume_root)
            state = read_train_state(directory)
            ckpt.load_masks(resume_root, self.model)
            restore_train_state(directory, state, self.optimizer)
            self.step = state["step"]
            print_rank0(f"resumed from {directory} at step {self.step}")
        else:
            self._fresh_logits()
        self.data = TrainBatches(
            prefix=cfg.data, seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
            global_batch_size=cfg.global_batch_size, train_iters=cfg.train_iters, seed=cfg.seed,
            vocab_size=self.args.vocab_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp)
        self.eval_windows = self._eval_windows()
        save = Path(cfg.save) if cfg.save else None
        self.metrics = MetricsLogger(
            enabled=is_main(), total_steps=cfg.train_iters,
            tensorboard_dir=cfg.tensorboard_dir or (str(save / "tensorboard") if save else None),
            history_path=str(save / HISTORY_FILE) if save else None,
            wandb_project=cfg.wandb_project, config=cfg.to_dict())

    # -- set-up ----------------------------------------------------------------------------------
    def _resume_root(self) -> str | None:
        """A training checkpoint to resume: ``--save`` if it has one (requeue), else ``--load``.

        Refuses (one line, nothing written) a ``--save`` that is another kind of checkpoint or
        another model's run, and a resume whose data settings changed (train/state.py).
        """
        cfg, run = self.cfg, self._run_tag()
        if cfg.save and check_resume(cfg.save, "--save", run=run,
                                     model=ckpt.read_checkpoint_meta(cfg.load)["model"],
                                     override=cfg.override_resume_config):
            return cfg.save
        if saved_run(cfg.load) is not None and ckpt.latest_iteration(cfg.load) is not None:
            check_resume(cfg.load, "--load", run=run, override=cfg.override_resume_config)
            return cfg.load
        return None

    def _run_tag(self) -> dict:
        return run_tag("maskllm", seq_length=self.cfg.seq_length,
                       global_batch_size=self.cfg.global_batch_size, data_prefix=self.cfg.data,
                       distill=self.distill)

    def _fresh_logits(self) -> None:
        """Logits at the start of a run: N(0, 0.01) shifted toward the prior's masks, if any.

        The prior is ``--prior``, else the masks of ``--load``. An imported prior (``mask_role``
        "prior", tools/import_masks.py --as-prior) brings its own strength and init seed.
        """
        cfg, meta = self.cfg, self.meta
        if meta.get("logits_are_init") and cfg.prior is None:  # format 1: baked prior logits
            ckpt.load_masks(cfg.load, self.model)
            print_rank0(f"prior: the logits stored in {cfg.load} (an imported prior)")
            return
        prior, strength, seed = cfg.prior, cfg.prior_strength, cfg.seed
        if prior is None and ckpt.has_masks(meta):
            prior = cfg.load
            if meta.get("mask_role") == "prior":
                strength = float(meta.get("prior_strength", strength))
                seed = int(meta.get("prior_seed", seed))
        init_logits(self.model, seed)
        if prior is not None:
            print_rank0(f"prior: masks of {prior} at strength {strength}")
            apply_prior(self.model, prior, self.args, strength)
        else:
            print_rank0("prior: none (logits start from N(0, 0.01))")

    def _eval_windows(self) -> torch.Tensor | None:
        """The same token windows ``tools/eval_ppl.py --data SPEC`` evaluates."""
        if not self.cfg.eval_data:
            return None
        from megatron.sparse.data.tokenizer import load_tokenizer
        from megatron.sparse.eval.datasets import eval_windows

        return eval_windows(self.cfg.eval_data, load_tokenizer(self.meta["tokenizer"]),
                            seq_length=self.cfg.seq_length, max_windows=self.cfg.eval_windows)

    # -- one optimizer step ----------------------------------------------------------------------
    def _schedule(self, step: int) -> dict[str, float]:
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
        set_mask_state(self.model, tau=values["tau"], kappa=values["kappa"], hard=cfg.hard,
                       noise=cfg.gumbel_noise)
        return values

    def train_step(self, step: int) -> dict[str, float]:
        values = self._schedule(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_micro = self.data.num_micro_batches
        sums: dict[str, torch.Tensor] = {}  # loss parts summed over micro batches ("ce", "kd")
        reg = torch.zeros(1)
        dp_rank = parallel_state.get_data_parallel_rank()
        for micro, (tokens, labels) in enumerate(self.data.micro_batches(step)):
            # Noise of global micro batch (micro * DP + dp_rank): the same at every TP x DP layout.
            set_mask_state(self.model, noise_seed=mask_ops.combine_seeds(
                self.cfg.seed, step, micro * self.dp + dp_rank))
            objective, parts = student_loss(self.model, tokens.to(self.device),
                                            labels.to(self.device), self.distill, self.teacher)
            loss = objective / n_micro
            if values["reg_lambda"] > 0:
                reg = sum(layer.sparse_weight_norm_sq() for _, layer in sparse_layers(self.model))
                loss = loss - values["reg_lambda"] * reg / n_micro
            loss.backward()
            for key, part in parts.items():
                sums[key] = sums.get(key, 0) + part.double().cpu().reshape(1)
        dp_group = parallel_state.get_data_parallel_group()
        if self.dp > 1:
            for p in self.logits:
                _all_reduce(p.grad, dp_group).div_(self.dp)
        norm = grad_norm(self.logits)
        if self.cfg.clip_grad > 0:
            coef = float(self.cfg.clip_grad / (norm + 1e-6))
            if coef < 1.0:
                for p in self.logits:
                    p.grad.mul_(coef)
        self.optimizer.step()
        means = {k: float(_all_reduce(v / n_micro, dp_group).div_(self.dp))
                 for k, v in sums.items()}
        reg_total = _all_reduce(reg.detach().reshape(1).double(), _tp_group())
        values.update(loss=self.distill.ce_weight * means["ce"]
                      + self.distill.kd_weight * means.get("kd", 0.0),
                      reg=float(reg_total), grad_norm=float(norm))
        if self.distill.enabled:
            values.update({"loss/ce": means["ce"], "loss/kd": means["kd"]})
        return values

    # -- the run ---------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        if not self.cfg.save:
            return
        meta = {k: v for k, v in self.meta.items()
                if k not in ("model", "logits_are_init", "mask_role", "prior_strength",
                             "prior_seed")}
        meta.update(mask_source="maskllm", run=self._run_tag(),
                    base_checkpoint=self.meta.get("base_checkpoint", self.cfg.load))
        ckpt.save_checkpoint(
            self.cfg.save, self.model, iteration=step, args=self.args, meta=meta,
            write_extra=lambda d: write_train_state(d, step=step, optimizer=self.optimizer,
                                                    info={"config": self.cfg.to_dict()}))
        print_rank0(f"saved {ckpt.iteration_dir(self.cfg.save, step)}")

    def evaluate(self, step: int) -> float | None:
        if self.eval_windows is None:
            return None
        ppl = megatron_perplexity(self.model, self.eval_windows,
                                  micro_batch_size=self.cfg.micro_batch_size).ppl
        self.metrics.scalars(step, {"eval_ppl": ppl})
        print_rank0(f"step {step}: held-out PPL {ppl:.3f} (argmax masks)")
        return ppl

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        flag = PreemptionFlag()
        tokens_per_step = cfg.global_batch_size * cfg.seq_length
        previous = argmax_snapshot(self.model)
        start_step = self.step
        if self.step == 0 and cfg.eval_interval:
            self.evaluate(0)
        # Throughput window: training steps only (evaluations and saves restart it).
        window_step, window_start = self.step, time.perf_counter()
        last: dict[str, float] = {}
        while self.step < cfg.train_iters:
            last = self.train_step(self.step)
            self.step += 1
            if self.step % cfg.log_interval == 0 or self.step == cfg.train_iters:
                elapsed = time.perf_counter() - window_start
                last["tokens_per_s"] = (tokens_per_step * (self.step - window_step)
                                        / max(elapsed, 1e-9))
                now = argmax_snapshot(self.model)
                last["changed"] = changed_fraction(previous, now)
                previous = now
                self.metrics.scalars(self.step, last)
                self.metrics.progress(self.step, last, steps_done=self.step - start_step)
                window_step, window_start = self.step, time.perf_counter()
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                last["eval_ppl"] = self.evaluate(self.step)
                window_step, window_start = self.step, time.perf_counter()
            preempted = flag.any_rank()
            if preempted or (cfg.save_interval and self.step % cfg.save_interval == 0):
                self.save(self.step)
                window_step, window_start = self.step, time.perf_counter()
                if preempted:
                    print_rank0(f"preempted at step {self.step}: checkpoint written, exiting")
                    break
                if cfg.exit_after_save:
                    break
        else:
            if not (cfg.save_interval and self.step % cfg.save_interval == 0):
                self.save(self.step)
            if not (cfg.eval_interval and self.step % cfg.eval_interval == 0):
                last["eval_ppl"] = self.evaluate(self.step)
        self.metrics.close()
        return last
