"""Domain mask transfer on the embedded model: does a general mask make a good domain prior?

The second domain is Python's standard-library source (megatron/sparse/data/sources.py). Rows:
dense; SparseGPT + weight update calibrated on the domain; the general MaskLLM mask (learned on
the Wikipedia training split from the general SparseGPT prior, the demo's settings); a domain
mask learned from the domain SparseGPT prior; a domain mask learned from the general mask as
prior. The two domain masks get the same budget (steps x batch x sequence length). Every row is
evaluated on the domain's held-out files and on the Wikipedia held-out split (perplexity), and on
two local lm-eval tasks built from the domain's held-out files (a last-word cloze and a "which
continuation is real" choice, megatron/sparse/eval/zeroshot/local_tasks.py).

Stages run the ``tools/*.py`` commands through :class:`megatron.sparse.demo.Pipeline` and are
skipped when their output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from megatron.sparse.demo import Pipeline, RunSettings

WIKI = "embedded"


@dataclass
class TransferConfig(RunSettings):
    """Transfer-study settings; the shared ones are the demo's (docs/transfer.md)."""

    work_dir: str = "runs/transfer"
    """Where checkpoints, data, logs and results go."""
    train_iters: int = 40
    """Mask-learning steps of the general (Wikipedia) mask: the demo's 40."""
    eval_interval: int = 0
    """Held-out PPL every N mask-learning steps (0: only after the last step)."""
    save_interval: int = 3
    """Resumable mask-learning checkpoint every N steps: re-running the command after a kill
    (e.g. out of memory on a shared machine) resumes the run."""
    domain: str = "python-stdlib"
    """The domain: its training split is tokenised for calibration and mask learning, and
    ``tools/eval_ppl.py --data DOMAIN`` reads its held-out split."""
    domain_iters: int = 20
    """Mask-learning steps of each domain mask (both get the same steps, batch and length)."""
    dense: str | None = None
    """A converted dense checkpoint of the embedded model to reuse (default: convert it)."""
    task_examples: int = 200
    """Examples per domain local task (0: no accuracy columns)."""
    task_seed: int = 1234
    """Seed of the domain local tasks."""
    general_prior: str | None = None
    """One-shot Wikipedia checkpoint whose masks are the general mask's prior (default: SparseGPT
    with the weight update on the Wikipedia training split, pruned here)."""


class TransferStudy(Pipeline):
    """The transfer stages, on the demo's runner."""

    cfg: TransferConfig

    def domain_ppl(self, checkpoint: Path, label: str, data: str) -> float:
        """Held-out PPL on ``data``, cached under the work directory (inputs may be read-only)."""
        cache = self.root / "ppl" / f"{label}.{data}.json"
        cache.parent.mkdir(parents=True, exist_ok=True)
        return self.ppl(checkpoint, data=data, cache=cache)

    def domain_tasks(self) -> list[Path]:
        """The domain's local task files (built once, from its held-out split only)."""
        from megatron.sparse.eval.zeroshot.local_tasks import build_local_tasks

        out = self.root / "tasks"
        prefix = "".join(c if c.isalnum() else "_" for c in self.cfg.domain)
        files = [out / f"{prefix}_{kind}.yaml" for kind in ("cloze", "choice")]
        if not all(f.is_file() for f in files):
            build_local_tasks(domain_heldout_texts(self.cfg.domain), out, prefix=prefix,
                              n_examples=self.cfg.task_examples, seed=self.cfg.task_seed)
        return files

    def accuracy(self, checkpoint: Path, label: str, tasks: list[Path]) -> dict[str, float]:
        """``{task: accuracy}`` of a checkpoint on the local tasks (cached under the work dir)."""
        out = self.root / "accuracy" / f"{label}.json"
        if not out.is_file():
            self.tool("eval_zeroshot", "--load", str(checkpoint), "--tasks",
                      ",".join(map(str, tasks)), "--output", str(out), nproc=self.cfg.tp)
        rows = json.loads(out.read_text())["results"]
        return {r["task"]: r["value"] for r in rows if r["metric"] == "acc"}

    def learned(self, run: Path, label: str, own_data: str, iters: int) -> dict[str, float]:
        """A learned mask's PPL on both sets: the trainer's final evaluation for its own data."""
        other = WIKI if own_data == self.cfg.domain else self.cfg.domain
        own_cache = self.root / "ppl" / f"{label}.{own_data}.json"
        return {own_data: self.learned_ppl(run, train_iters=iters, data=own_data, cache=own_cache),
                other: self.domain_ppl(run, label, other)}

    def run(self) -> dict[str, dict[str, float]]:
        cfg, start = self.cfg, time.perf_counter()
        dense = Path(cfg.dense) if cfg.dense else self.convert()
        wiki_train = self.preprocess()
        domain_train = self.preprocess(cfg.domain, "domain_train")
        domain_sgpt = self.prune(dense, domain_train, "sparsegpt", update=True,
                                 out=self.root / "sparsegpt_update_domain")
        general_prior = (Path(cfg.general_prior) if cfg.general_prior else
                         self.prune(dense, wiki_train, "sparsegpt", update=True))
        general = self.learn(dense, general_prior, wiki_train, out=self.root / "maskllm_general",
                             eval_data=WIKI)
        budget = {"train_iters": cfg.domain_iters, "eval_data": cfg.domain}
        from_general = self.learn(dense, general, domain_train,
                                  out=self.root / "maskllm_domain_from_general", **budget)
        from_sgpt = self.learn(dense, domain_sgpt, domain_train,
                               out=self.root / "maskllm_domain_from_sparsegpt", **budget)
        rows = {
            "dense": {d: self.domain_ppl(dense, "dense", d) for d in (cfg.domain, WIKI)},
            "SparseGPT+update (domain calibration)": {
                d: self.domain_ppl(domain_sgpt, "sparsegpt_domain", d) for d in (cfg.domain, WIKI)},
            "MaskLLM general (Wikipedia)": self.learned(general, "general", WIKI,
                                                        cfg.train_iters),
            "MaskLLM domain, SparseGPT prior": self.learned(from_sgpt, "from_sparsegpt",
                                                            cfg.domain, cfg.domain_iters),
            "MaskLLM domain, general-mask prior": self.learned(from_general, "from_general",
                                                               cfg.domain, cfg.domain_iters),
        }
        if cfg.task_examples > 0:
            tasks = self.domain_tasks()
            checkpoints = {"dense": dense, "SparseGPT+update (domain calibration)": domain_sgpt,
                           "MaskLLM general (Wikipedia)": general,
                           "MaskLLM domain, SparseGPT prior": from_sgpt,
                           "MaskLLM domain, general-mask prior": from_general}
            for i, (name, checkpoint) in enumerate(checkpoints.items()):
                rows[name] |= self.accuracy(checkpoint, f"row{i}", tasks)
        table = self.transfer_table(rows)
        (self.root / "results.md").write_text(table + "\n")
        (self.root / "results.json").write_text(json.dumps(rows, indent=1))
        print("\n" + table)
        print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
        print(f"total wall time: {time.perf_counter() - start:.0f}s")
        return rows

    def transfer_table(self, rows: dict[str, dict[str, float]]) -> str:
        """Markdown table: domain and Wikipedia held-out PPL per row, and the study's verdict."""
        cfg = self.cfg
        tokens = cfg.domain_iters * cfg.global_batch_size * cfg.seq_length
        tasks = sorted(k for k in next(iter(rows.values())) if k not in (cfg.domain, WIKI))
        lines = ["| row | " + " | ".join([f"{cfg.domain} held-out PPL", *[f"{t} acc" for t in tasks],
                                          "Wikipedia held-out PPL"]) + " |",
                 "|---" * (3 + len(tasks)) + "|"]
        lines += ["| " + " | ".join([name, f"{r[cfg.domain]:.2f}", *[f"{r[t]:.3f}" for t in tasks],
                                     f"{r[WIKI]:.2f}"]) + " |" for name, r in rows.items()]
        ours = rows["MaskLLM domain, general-mask prior"][cfg.domain]
        rivals = [rows[k][cfg.domain] for k in ("MaskLLM general (Wikipedia)",
                                                "MaskLLM domain, SparseGPT prior")]
        lines.append(f"\nDomain masks: {cfg.domain_iters} steps x {cfg.global_batch_size} x "
                     f"{cfg.seq_length} tokens ({tokens} tokens) each; general mask: "
                     f"{cfg.train_iters} steps on Wikipedia. PPL over {cfg.eval_windows} windows "
                     f"of {cfg.seq_length} tokens. General-mask prior beats both rivals on the "
                     f"domain: {'yes' if ours < min(rivals) else 'no'}."
                     + (f" Local tasks: {cfg.task_examples} examples each, built from the "
                        f"domain's held-out files (seed {cfg.task_seed})." if tasks else ""))
        return "\n".join(lines)


def domain_heldout_texts(domain: str) -> list[str]:
    """The held-out documents of a domain: one per file for python-stdlib, else the blank-line
    separated blocks of its evaluation text."""
    from megatron.sparse.data.sources import STDLIB, file_documents
    from megatron.sparse.eval.datasets import eval_text

    if domain == STDLIB:
        return file_documents(STDLIB, "heldout")
    return [block for block in eval_text(domain).split("\n\n") if block.strip()]
