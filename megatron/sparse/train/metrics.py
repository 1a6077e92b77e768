"""Run metrics: a progress line, tensorboardX scalars, optional wandb, and a JSONL history."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

HISTORY_FILE = "metrics.jsonl"
"""The JSONL history a run writes into its ``--save`` directory, one record per log/eval."""


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` in write order (``step`` plus scalars)."""
    lines = (Path(run_dir) / HISTORY_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsLogger:
    """Rank-0 sink for scalars; a no-op object on other ranks (``enabled=False``)."""

    def __init__(self, *, enabled: bool, total_steps: int, tensorboard_dir: str | None,
                 history_path: str | None, wandb_project: str | None, config: dict[str, Any]):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.wandb_run = None
        self.history = None
        self._t0 = time.perf_counter()
        self._steps_timed = 0
        if not enabled:
            return
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if history_path:
            Path(history_path).parent.mkdir(parents=True, exist_ok=True)
            self.history = open(history_path, "a", buffering=1)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("error: --wandb-project needs wandb: pip install "
                                 "'megatron-sparse[logging]'") from exc
            self.wandb_run = wandb.init(project=wandb_project, config=config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars for ``step`` in every sink."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.history is not None:
            self.history.write(json.dumps({"step": step, **values}) + "\n")

    def progress(self, step: int, values: dict[str, float], *, steps_done: int) -> None:
        """Print one progress line with throughput and ETA (``steps_done`` since start/resume)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(steps_done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in values.items()]
        parts.append(f"ETA {_eta(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.history is not None:
            self.history.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
