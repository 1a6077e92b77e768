"""The end-to-end pipeline on the embedded default model, as a sequence of tool invocations.

Each stage runs one of ``tools/*.py`` in a subprocess (the same commands a user types), prints
the command and its wall time, and is skipped when its output already exists, so an interrupted
demo resumes where it stopped. The result is a perplexity table (markdown), a PNG of the
mask-learning curves and a Hugging Face export of the learned masks (masked safetensors + packed
mask file) whose perplexity is re-measured with ``transformers`` alone.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron.sparse.train.metrics import read_history

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@dataclass
class RunSettings:
    """Settings every pipeline on the embedded model shares, chosen by measurement on 2 CPU cores
    (see docs/demo.md)."""

    work_dir: str = "runs/demo"
    """Where checkpoints, data, logs and results go."""
    tp: int = 1
    """Tensor-parallel size (the embedded model has 9 heads / 3 KV heads: TP 1 or 3)."""
    seq_length: int = 256
    """Tokens per sequence for calibration, training and evaluation."""
    calib_samples: int = 32
    """Calibration sequences for the one-shot methods (and the prior)."""
    eval_windows: int = 40
    """Held-out windows for every perplexity in the table."""
    train_iters: int = 40
    """Mask-learning steps."""
    global_batch_size: int = 4
    """Sequences per mask-learning step."""
    micro_batch_size: int = 4
    """Sequences per forward pass (one micro batch per step: one mask sample per step)."""
    lr: float = 1e-2
    """Mask-logits learning rate (the multiplier is 1 in the demo), cosine to a tenth."""
    adam_eps: float = 1e-4
    """AdamW epsilon. With the default 1e-8 every group whose gradient keeps its sign flips at the
    same step, however small the gradient (a burst of ~6 % of the groups, PPL 182 -> 464);
    1e-4 lets groups move in proportion to their gradient (measured: PPL 182 -> 101)."""
    tau_start: float = 1.0
    """Gumbel temperature at step 0."""
    tau_end: float = 0.5
    """Gumbel temperature at the end (milder than the paper's: sharper masks stop the flips)."""
    kappa_start: float = 100.0
    """Logit scaling at step 0."""
    kappa_end: float = 200.0
    """Logit scaling at the end."""
    prior_strength: float = 10.0
    """Prior strength: 10 reproduces the SparseGPT mask exactly at step 0."""
    reg_lambda: float = 0.0
    """Sparse-weight regulariser. The paper's 1e-5 (on a sum over all weights, ~3e6 here) outweighs
    the LM loss ~6x at this budget and drives the masks toward magnitude pruning (measured)."""
    eval_interval: int = 10
    """Held-out PPL every N mask-learning steps (for the curve)."""
    save_interval: int = 0
    """Resumable mask-learning checkpoint every N steps (0: only at the end); a killed run then
    resumes from it when the command is re-run."""


@dataclass
class DemoConfig(RunSettings):
    """Demo settings (see docs/demo.md)."""

    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"])
    """One-shot baselines in the table."""
    ast: bool = True
    """Add adaptive sparse training (docs/ast.md) from the SparseGPT masks at MaskLLM's token
    budget (the same steps and batch): weights retrained, KD from the dense model, SLoRB."""
    ast_lr: float = 1e-4
    """AST peak learning rate (cosine to a tenth after 4 warm-up steps)."""
    ast_srste_decay: float = 2e-4
    """AST's SR-STE decay on the pruned weights, ramped in over the first quarter of the steps."""
    ast_kd_weight: float = 0.5
    """AST's distillation weight (CE 1, T 2)."""
    ast_slorb_k: int = 16
    """AST's SLoRB group size (0: off)."""


class Pipeline:
    """Runs the demo stages in order."""

    def __init__(self, cfg: RunSettings):
        self.cfg = cfg
        self.root = Path(cfg.work_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def tool(self, name: str, *args: str, nproc: int = 1, capture: bool = False) -> str:
        """Run ``tools/<name>.py`` (under torchrun when ``nproc > 1``); return stdout if captured."""
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(nproc)]
        cmd = [*launcher, str(TOOLS / f"{name}.py"), *args]
        print(f"\n$ {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, check=False, text=True,
                                stdout=subprocess.PIPE if capture else None)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"error: stage {name} failed (exit {result.returncode})")
        return result.stdout if capture else ""

    def _cached_ppl(self, cache: Path, name: str, *args: str, nproc: int = 1,
                    data: str = "embedded") -> float:
        """Run an evaluation tool with ``--json`` on ``data`` once; later runs read ``cache``."""
        if cache.is_file():
            return json.loads(cache.read_text())["ppl"]
        out = self.tool(name, *args, "--data", data, "--seq-length",
                        str(self.cfg.seq_length), "--max-windows", str(self.cfg.eval_windows),
                        "--json", nproc=nproc, capture=True)
        result = json.loads(out.strip().splitlines()[-1])
        cache.write_text(json.dumps(result))
        return result["ppl"]

    def ppl(self, checkpoint: Path, *, data: str = "embedded", cache: Path | None = None) -> float:
        """Held-out PPL of a Megatron checkpoint on ``data`` (cached in ``cache``, by default next
        to the checkpoint)."""
        return self._cached_ppl(cache or checkpoint / "demo_ppl.json", "eval_ppl", "--load",
                                str(checkpoint), nproc=self.cfg.tp, data=data)

    def learned_ppl(self, run: Path, *, train_iters: int | None = None, data: str = "embedded",
                    cache: Path | None = None) -> float:
        """MaskLLM's held-out PPL: the trainer's evaluation after its last step.

        It runs the same windows through the same code as ``tools/eval_ppl.py``, so a second
        process would only repeat it; the HF-side check re-measures it independently.
        """
        final = [r["eval_ppl"] for r in read_history(run) if "eval_ppl" in r and
                 r["step"] == (train_iters or self.cfg.train_iters)]
        return final[-1] if final else self.ppl(run, data=data, cache=cache)

    # -- stages ----------------------------------------------------------------------------------
    def convert(self) -> Path:
        out = self.root / "dense"
        if not (out / "latest_checkpointed_iteration.txt").is_file():
            self.tool("convert_hf_to_megatron", "--hf", "embedded", "--tp", str(self.cfg.tp),
                      "--out", str(out))
        return out

    def preprocess(self, source: str = "embedded-train", name: str = "wiki_train") -> str:
        """Tokenise a training split (evaluation tokenises the held-out text itself)."""
        prefix = self.root / "data" / name
        if not Path(f"{prefix}.idx").is_file():
            self.tool("preprocess_data", "--input", source, "--tokenizer", "embedded",
                      "--out", str(prefix))
        return str(prefix)

    def prune(self, dense: Path, train_data: str, method: str, update: bool = False, *,
              out: Path | None = None) -> Path:
        out = out or self.root / (f"{method}_update" if update else method)
        if not (out / "latest_checkpointed_iteration.txt").is_file():
            self.tool("prune_oneshot", "--load", str(dense), "--method", method,
                      *(["--update-weight"] if update else []), "--calib-data", train_data,
                      "--calib-samples", str(self.cfg.calib_samples), "--seq-length",
                      str(self.cfg.seq_length), "--save", str(out), nproc=self.cfg.tp)
        return out

    def learn(self, dense: Path, prior: Path, train_data: str, *, out: Path | None = None,
              eval_data: str = "embedded", train_iters: int | None = None) -> Path:
        """MaskLLM from ``prior``'s masks on ``train_data`` (default: the demo's run)."""
        cfg, out = self.cfg, out or self.root / "maskllm"
        iters = train_iters or cfg.train_iters
        latest = out / "latest_checkpointed_iteration.txt"
        if not (latest.is_file() and int(latest.read_text()) >= iters):
            flags = {
                "load": dense, "prior": prior, "prior-strength": cfg.prior_strength,
                "data": train_data, "eval-data": eval_data, "eval-windows": cfg.eval_windows,
                "eval-interval": cfg.eval_interval, "save-interval": cfg.save_interval,
                "keep-checkpoints": 1, "save": out,
                "seq-length": cfg.seq_length, "micro-batch-size": cfg.micro_batch_size,
                "global-batch-size": cfg.global_batch_size, "train-iters": iters,
                "lr": cfg.lr, "min-lr": cfg.lr / 10, "adam-eps": cfg.adam_eps,
                "logits-lr-mult": 1, "weight-decay": 0, "tau-start": cfg.tau_start,
                "tau-end": cfg.tau_end, "kappa-start": cfg.kappa_start,
                "kappa-end": cfg.kappa_end, "reg-lambda": cfg.reg_lambda, "log-interval": 4,
            }
            args = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
            self.tool("train_mask", *args, nproc=cfg.tp)
        return out

    def adaptive(self, start: Path, train_data: str) -> Path:
        """AST from a one-shot checkpoint at MaskLLM's token budget."""
        cfg, out = self.cfg, self.root / "ast"
        latest = out / "latest_checkpointed_iteration.txt"
        if not (latest.is_file() and int(latest.read_text()) >= cfg.train_iters):
            flags = {
                "load": start, "data": train_data, "eval-data": "embedded",
                "eval-windows": cfg.eval_windows, "eval-interval": cfg.eval_interval,
                "save": out, "seq-length": cfg.seq_length,
                "micro-batch-size": cfg.micro_batch_size,
                "global-batch-size": cfg.global_batch_size, "train-iters": cfg.train_iters,
                "lr": cfg.ast_lr, "min-lr": cfg.ast_lr / 10,
                "warmup-iters": min(4, cfg.train_iters - 1),
                "srste-decay": cfg.ast_srste_decay,
                "srste-warmup-iters": max(cfg.train_iters // 4, 1),
                "kd-weight": cfg.ast_kd_weight, "slorb-k": cfg.ast_slorb_k, "log-interval": 4,
            }
            args = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
            self.tool("train_ast", *args, "--slorb-train-projection", nproc=cfg.tp)
        return out

    def export(self, learned: Path) -> tuple[Path, Path]:
        """Masked safetensors + packed mask file of the learned masks."""
        out = self.root / "hf_maskllm"
        if not (out / "config.json").is_file():
            self.tool("export_hf", "--load", str(learned), "--out", str(out))
        return out, out / "masks.npz"

    def hf_ppl(self, export_dir: Path, mask_file: Path) -> dict[str, float]:
        """PPL with transformers alone: the dense model + mask file, and the masked export."""
        return {
            "HF dense + masks.npz": self._cached_ppl(
                self.root / "hf_mask_ppl.json", "eval_hf_ppl", "--model", "embedded", "--mask",
                str(mask_file)),
            "HF masked safetensors": self._cached_ppl(
                self.root / "hf_export_ppl.json", "eval_hf_ppl", "--model", str(export_dir)),
        }

    def plot(self, run: Path, ast_run: Path | None = None) -> Path:
        """loss and held-out PPL vs step, from the trainers' metrics.jsonl (AST's PPL beside)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_history(run)
        loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ppl = [(r["step"], r["eval_ppl"]) for r in rows if "eval_ppl" in r]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(*zip(*loss), label="train CE (soft masks)")
        ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend()
        ax2.plot(*zip(*ppl), marker="o", label="held-out PPL (argmax masks)")
        if ast_run is not None:
            ast_ppl = [(r["step"], r["eval_ppl"]) for r in read_history(ast_run)
                       if "eval_ppl" in r]
            ax2.plot(*zip(*ast_ppl), marker="s", label="AST held-out PPL (weights retrained)")
        ax2.set_xlabel("step"), ax2.set_ylabel("perplexity"), ax2.legend()
        fig.suptitle("MaskLLM on the embedded SmolLM2-135M")
        fig.tight_layout()
        path = self.root / "maskllm_curves.png"
        fig.savefig(path, dpi=100)
        return path

    def table(self, rows: list[tuple[str, float]], dense_ppl: float) -> str:
        lines = [f"| method | held-out PPL (seq {self.cfg.seq_length}) |", "|---|---|"]
        lines += [f"| {name} | {ppl:.2f} |" for name, ppl in rows]
        sgpt = dict(rows).get("SparseGPT")
        mask = dict(rows).get("MaskLLM")
        if sgpt and mask:
            ratio = (mask - dense_ppl) / (sgpt - dense_ppl)
            lines.append(f"\n(MaskLLM - dense) / (SparseGPT - dense) = {ratio:.3f}")
        if sgpt and dict(rows).get("AST"):
            ratio = (dict(rows)["AST"] - dense_ppl) / (sgpt - dense_ppl)
            lines.append(f"(AST - dense) / (SparseGPT - dense) = {ratio:.3f}")
        return "\n".join(lines)

    def run(self) -> None:
        start = time.perf_counter()
        dense = self.convert()
        train_data = self.preprocess()
        rows = [("dense", self.ppl(dense))]
        names = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
        pruned = {m: self.prune(dense, train_data, m) for m in self.cfg.methods}
        rows += [(names[m], self.ppl(p)) for m, p in pruned.items()]
        learned = self.learn(dense, pruned["sparsegpt"], train_data)
        rows.append(("MaskLLM", self.learned_ppl(learned)))
        ast_run = self.adaptive(pruned["sparsegpt"], train_data) if self.cfg.ast else None
        if ast_run is not None:
            rows.append(("AST", self.learned_ppl(ast_run)))
        export_dir, mask_file = self.export(learned)
        hf = self.hf_ppl(export_dir, mask_file)
        table = self.table(rows, rows[0][1])
        table += "\n\nMaskLLM export, re-measured with transformers alone:\n"
        table += "\n".join(f"- {name}: {ppl:.2f}" for name, ppl in hf.items())
        table += f"\n- mask file: {mask_file} ({mask_file.stat().st_size / 2**20:.2f} MiB)"
        (self.root / "results.md").write_text(table + "\n")
        plot = self.plot(learned, ast_run)
        print("\n" + table)
        print(f"\ncurves: {plot}\nresults: {self.root / 'results.md'}")
        print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
        print(f"total wall time: {time.perf_counter() - start:.0f}s")
