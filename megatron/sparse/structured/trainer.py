"""The policy-gradient learning loop over keep-probabilities (forward passes only).

Per step: one batch; ``K`` masks ``m_k ~ Bernoulli(s)`` (counter-based, the same on every rank);
the loss of the masked model under each; the baseline update; the estimate of
:mod:`megatron.sparse.structured.estimator`; ``s <- s - lr g`` (cosine lr) on every pruned pool;
the projection onto the budget. Under data parallelism the ``K`` samples are split over the DP
ranks (sample ``k`` on DP rank ``k % dp``) and the losses all-reduced; under tensor parallelism
every rank holds the unsharded probabilities and its masking hooks use its shard.

The state (probabilities, baseline, step) is written to ``SAVE/structured_state.pt`` through a
temporary file and a rename; a rerun with the same ``--save`` resumes from it. The samples and
the data order are pure functions of (seed, step), so no RNG state needs saving.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse.model import LlamaArgs, model_forward
from megatron.sparse.parallel import is_main, print_rank0
from megatron.sparse.prune.attention import fused_causal_attention
from megatron.sparse.structured.config import StructConfig
from megatron.sparse.structured.estimator import MovingBaseline, policy_gradient
from megatron.sparse.structured.masking import UnitMasker
from megatron.sparse.structured.policy import POOLS, Budget, KeepProbs
from megatron.sparse.structured.units import (UnitMasks, attention_params_per_group,
                                               full_parameters)
from megatron.sparse.train.metrics import HISTORY_FILE, MetricsLogger
from megatron.sparse.train.schedules import warmup_cosine

STATE_FILE = "structured_state.pt"


def _dp() -> tuple[int, int, object]:
    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_group())
    return 1, 0, None


@torch.no_grad()
def batch_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *,
               micro_batch_size: int) -> float:
    """Mean token cross entropy of ``[b, s]`` tokens -> labels (identical on all TP ranks)."""
    total, count = 0.0, 0
    with fused_causal_attention(model.decoder.layers):
        for start in range(0, tokens.shape[0], micro_batch_size):
            losses = model_forward(model, tokens[start:start + micro_batch_size],
                                   labels[start:start + micro_batch_size])
            total += float(losses.double().sum())
            count += losses.numel()
    return total / count


def save_state(path: Path, probs: KeepProbs, baseline: MovingBaseline, step: int,
               cfg: StructConfig) -> None:
    """Write the learning state (rank 0; temporary file and rename)."""
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"probs": probs.state_dict(), "baseline": baseline.value, "step": step,
                "keep_ratio": cfg.keep_ratio, "units": cfg.units}, tmp)
    tmp.replace(path)


def load_state(path: Path, args: LlamaArgs, cfg: StructConfig):
    """``(probs, baseline value, step)`` of a saved run, or None; one-line errors on mismatch."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    for key in ("keep_ratio", "units"):
        if state[key] != getattr(cfg, key):
            raise ValueError(f"{path} was written with --{key.replace('_', '-')} {state[key]}, "
                             f"not {getattr(cfg, key)}; pass the same value or a fresh --save")
    return KeepProbs.from_state_dict(state["probs"], args), state["baseline"], state["step"]


class StructuredLearner:
    """Learns keep-probabilities of a loaded model; see the module docstring."""

    def __init__(self, *, model: torch.nn.Module, args: LlamaArgs, cfg: StructConfig,
                 budget: Budget, probs: KeepProbs, data, baseline: float | None = None,
                 step: int = 0):
        self.model, self.args, self.cfg, self.budget = model, args, cfg, budget
        self.probs, self.data, self.step = probs, data, step
        self.baseline = MovingBaseline(cfg.baseline_alpha, baseline)
        self.masker = UnitMasker(model, args)
        self.dp, self.dp_rank, self.dp_group = _dp()
        if self.dp > cfg.samples_per_step:
            raise ValueError(f"{self.dp} data-parallel ranks but --samples-per-step "
                             f"{cfg.samples_per_step}; use at least one sample per DP rank")
        if cfg.samples_per_step < 2 and cfg.estimator == "normalized":
            raise ValueError("the normalized estimator divides by K - 1: use "
                             "--samples-per-step >= 2")
        save = Path(cfg.save) if cfg.save else None
        self.state_path = save / STATE_FILE if save else None
        self.metrics = MetricsLogger(
            enabled=is_main(), total_steps=cfg.steps,
            tensorboard_dir=cfg.tensorboard_dir or (str(save / "tensorboard") if save else None),
            history_path=str(save / HISTORY_FILE) if save else None, wandb_project=None,
            config=cfg.to_dict())

    def lr(self, step: int, pool: str = "channels") -> float:
        peak = self.cfg.lr
        if pool == "kv_groups" and self.cfg.heads_lr is not None:
            peak = self.cfg.heads_lr
        return warmup_cosine(step, peak=peak, minimum=self.cfg.min_lr_fraction * peak, warmup=0,
                             total=self.cfg.steps)

    def sample_losses(self, step: int, tokens: torch.Tensor, labels: torch.Tensor):
        """The ``K`` masks of a step and their losses (each DP rank runs its share)."""
        k = self.cfg.samples_per_step
        masks = [self.probs.sample(seed=self.cfg.seed, step=step, sample=j, units=self.budget.units)
                 for j in range(k)]
        losses = torch.zeros(k, dtype=torch.float64)
        try:
            for j in range(self.dp_rank, k, self.dp):
                self.masker.set(masks[j])
                losses[j] = batch_loss(self.model, tokens, labels,
                                       micro_batch_size=self.cfg.micro_batch_size)
        finally:
            self.masker.set(None)
        if self.dp > 1:
            dist.all_reduce(losses, group=self.dp_group)
        return masks, losses

    def update(self, step: int, masks: list[UnitMasks], losses: torch.Tensor) -> float:
        """Baseline, estimate, SGD step and projection; returns the baseline used."""
        delta = self.baseline.update(float(losses.mean()))
        if self.cfg.baseline == "batch":
            delta = float(losses.mean())
        stacked = {"kv_groups": torch.stack([m.kv_groups for m in masks]),
                   "channels": torch.stack([m.channels for m in masks]),
                   "blocks": torch.stack([torch.stack([m.attention, m.mlp], 1) for m in masks])}
        pools = {"kv_groups": "heads", "channels": "channels", "blocks": "blocks"}
        for name in POOLS:
            if pools[name] not in self.budget.units:
                continue
            s = getattr(self.probs, name)
            g = policy_gradient(losses, stacked[name], s, delta, estimator=self.cfg.estimator)
            setattr(self.probs, name, s - self.lr(step, name) * g)
        self.probs.project(self.args, self.budget)
        return delta

    def run(self) -> KeepProbs:
        cfg = self.cfg
        tokens_per_step = cfg.samples_per_step * cfg.batch_size * cfg.seq_length
        start_step, t0, cpu0 = self.step, time.perf_counter(), time.process_time()
        while self.step < cfg.steps:
            step = self.step
            t_step = time.perf_counter()
            tokens, labels = next(iter(self.data.micro_batches(step)))
            masks, losses = self.sample_losses(step, tokens, labels)
            delta = self.update(step, masks, losses)
            self.step += 1
            elapsed = time.perf_counter() - t_step
            values = {"loss": float(losses.mean()), "baseline": delta, "lr": self.lr(step),
                      "kept_fraction": self.kept_fraction(),
                      "tokens_per_s": tokens_per_step / elapsed,
                      "loss_spread": float(losses.max() - losses.min())}
            self.metrics.scalars(self.step, values)
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                self.metrics.progress(self.step, values, steps_done=self.step - start_step)
            if self.state_path and (self.step % cfg.save_interval == 0 or self.step == cfg.steps):
                save_state(self.state_path, self.probs, self.baseline, self.step, cfg)
        self.masker.remove()
        self.metrics.close()
        if self.step > start_step:
            print_rank0(f"learned {self.step - start_step} steps in "
                        f"{time.perf_counter() - t0:.0f}s ({(time.process_time() - cpu0) / 60:.1f} "
                        f"CPU-minutes on rank 0)")
        return self.probs

    def kept_fraction(self) -> float:
        """Expected kept fraction of attention + MLP parameters under the current ``s``."""
        a, p = self.args, self.probs
        attn = (p.kv_groups * p.blocks[:, :1]).sum() * attention_params_per_group(a)
        mlp = (p.channels * p.blocks[:, 1:]).sum() * 3 * a.hidden_size
        norms = p.blocks.sum() * a.hidden_size
        return float((attn + mlp + norms) / full_parameters(a))

