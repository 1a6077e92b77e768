"""The one training loop of every method that trains (mask learning, adaptive sparse training).

Runs under torchrun with TP x DP ranks (gloo on CPU, nccl on GPU): TP shards the model, DP splits
each global batch and averages the trained parameters' gradients. Resumable from interval
checkpoints and from the checkpoint written on SIGTERM/SIGUSR1 (Slurm preemption). What is
trained, and how, is the method's (:mod:`megatron.sparse.train.methods`); checkpoints, resume,
data, evaluation and logging are the same for all.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron.sparse import checkpoint as ckpt
from megatron.sparse import slorb
from megatron.sparse.compat import default_device
from megatron.sparse.eval.perplexity import megatron_perplexity
from megatron.sparse.model import LlamaArgs
from megatron.sparse.parallel import is_main, print_rank0
from megatron.sparse.train.collectives import all_reduce, average_over_dp, clip_gradients
from megatron.sparse.train.collectives import PreemptionFlag  # noqa: F401  (re-exported)
from megatron.sparse.train.config import AstConfig, RunConfig, TrainConfig
from megatron.sparse.train.data import TrainBatches
from megatron.sparse.train.distill import DistillConfig
from megatron.sparse.train.methods import MaskLearning, TrainingMethod
from megatron.sparse.train.metrics import HISTORY_FILE, MetricsLogger
from megatron.sparse.train.state import (
    check_resume, read_train_state, restore_train_state, run_tag, saved_run, write_train_state,
)

# model_args.json entries of a source checkpoint that describe its own masks, not the run's
_SOURCE_ONLY_META = ("model", "logits_are_init", "mask_role", "prior_strength", "prior_seed")


def method_for(cfg: RunConfig) -> TrainingMethod:
    """The training method a configuration describes."""
    if isinstance(cfg, AstConfig):
        from megatron.sparse.train.ast import AdaptiveSparseTraining

        return AdaptiveSparseTraining(cfg)
    if isinstance(cfg, TrainConfig):
        return MaskLearning(cfg)
    raise TypeError(f"no training method for {type(cfg).__name__}")


class Trainer:
    """Builds the run from a config (``TrainConfig``: MaskLLM, ``AstConfig``: AST) and trains."""

    def __init__(self, cfg: RunConfig, method: TrainingMethod | None = None):
        self.cfg = cfg
        self.distill = DistillConfig.from_config(cfg)  # validated before anything is read
        if cfg.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be >= 0 (0 keeps all), got "
                             f"{cfg.keep_checkpoints}")
        self.method = method or method_for(cfg)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.dp = parallel_state.get_data_parallel_world_size()
        resume_root = self._resume_root()
        self.source = resume_root or cfg.load
        self.meta = ckpt.read_checkpoint_meta(self.source)
        self.args = LlamaArgs.from_dict(self.meta["model"])
        self.device = default_device()
        self.model = self.args.build(mask_kind=self.method.mask_kind, device=self.device)
        slorb.attach_from_meta(self.model, self.meta)  # a SLoRB run's branches load too
        print_rank0(f"loading {self.source} at TP={self.tp} x DP={self.dp}")
        ckpt.load_into(self.source, self.model, masks=False)
        self.step = 0
        directory = ckpt.resolve_iteration(resume_root) if resume_root else None
        self.method.setup(self, directory)
        if directory is not None:
            state = read_train_state(directory)
            restore_train_state(directory, state, self.method.optimizer)
            self.step = state["step"]
            print_rank0(f"resumed from {directory} at step {self.step}")
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

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.method.optimizer

    # -- set-up ----------------------------------------------------------------------------------
    def _resume_root(self) -> str | None:
        """A training checkpoint to resume: ``--save`` if it has one (requeue), else ``--load``.

        Refuses (one line, nothing written) a ``--save`` that is another kind of checkpoint or
        another method's or model's run, and a resume whose data settings changed (train/state.py).
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
        return run_tag(self.method.name, seq_length=self.cfg.seq_length,
                       global_batch_size=self.cfg.global_batch_size, data_prefix=self.cfg.data,
                       distill=self.distill)

    def _eval_windows(self) -> torch.Tensor | None:
        """The same token windows ``tools/eval_ppl.py --data SPEC`` evaluates."""
        if not self.cfg.eval_data:
            return None
        from megatron.sparse.data.tokenizer import load_tokenizer
        from megatron.sparse.eval.datasets import eval_windows

        return eval_windows(self.cfg.eval_data, load_tokenizer(self.meta["tokenizer"]),
                            seq_length=self.cfg.seq_length, max_windows=self.cfg.eval_windows)

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (forward/backward of every micro batch, DP average, clip, update);
        the method's step-boundary work (AST: the mask update) follows it."""
        method = self.method
        values = method.schedule(step)
        self.model.train()
        method.optimizer.zero_grad(set_to_none=True)
        n_micro = self.data.num_micro_batches
        sums: dict[str, torch.Tensor] = {}  # loss parts summed over micro batches ("ce", "kd")
        dp_rank = parallel_state.get_data_parallel_rank()
        for micro, (tokens, labels) in enumerate(self.data.micro_batches(step)):
            loss, parts = method.micro_loss(tokens.to(self.device), labels.to(self.device),
                                         step=step, global_micro=micro * self.dp + dp_rank,
                                         n_micro=n_micro, values=values)
            loss.backward()
            for key, part in parts.items():
                sums[key] = sums.get(key, 0) + part.double().cpu().reshape(1)
        average_over_dp(method.params)
        norm = clip_gradients(method.params, self.cfg.clip_grad)
        method.optimizer.step()
        method.after_step(step + 1)
        dp_group = parallel_state.get_data_parallel_group()
        means = {k: float(all_reduce(v / n_micro, dp_group).div_(self.dp))
                 for k, v in sums.items()}
        values.update(loss=self.distill.ce_weight * means["ce"]
                      + self.distill.kd_weight * means.get("kd", 0.0),
                      **method.step_scalars(), grad_norm=float(norm))
        if self.distill.enabled:
            values.update({"loss/ce": means["ce"], "loss/kd": means["kd"]})
        return values

    # -- the run ---------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        if not self.cfg.save:
            return
        meta = {k: v for k, v in self.meta.items() if k not in _SOURCE_ONLY_META}
        meta.update(mask_source=self.method.name, run=self._run_tag(),
                    base_checkpoint=self.meta.get("base_checkpoint", self.cfg.load),
                    **self.method.checkpoint_meta())

        def write_extra(directory: Path) -> None:
            write_train_state(directory, step=step, optimizer=self.method.optimizer,
                              info={"config": self.cfg.to_dict()})
            self.method.write_state(directory)

        ckpt.save_checkpoint(self.cfg.save, self.model, iteration=step, args=self.args,
                             meta=meta, write_extra=write_extra)
        print_rank0(f"saved {ckpt.iteration_dir(self.cfg.save, step)}")
        if self.cfg.keep_checkpoints:
            ckpt.remove_old_iterations(self.cfg.save, keep=self.cfg.keep_checkpoints)

    def evaluate(self, step: int) -> float | None:
        if self.eval_windows is None:
            return None
        ppl = megatron_perplexity(self.model, self.eval_windows,
                                  micro_batch_size=self.cfg.micro_batch_size).ppl
        self.metrics.scalars(step, {"eval_ppl": ppl})
        print_rank0(f"step {step}: held-out PPL {ppl:.3f}{self.method.eval_note}")
        return ppl

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        flag = PreemptionFlag()
        tokens_per_step = cfg.global_batch_size * cfg.seq_length
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
                last.update(self.method.window_scalars())
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


MaskTrainer = Trainer
"""The name tools and tests used before the loop served more than one method."""
