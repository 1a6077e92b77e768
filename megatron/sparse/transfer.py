"""Domain mask transfer on the embedded model: does a general mask make a good domain prior?

The second domain is Python's standard-library source (megatron/sparse/data/sources.py). Rows:
dense; SparseGPT + weight update calibrated on the domain; the general MaskLLM mask (learned on
the Wikipedia training split from the general SparseGPT prior, the demo's settings); a domain
mask learned from the domain SparseGPT prior; a domain mask learned from the general mask as
prior. The two domain masks get the same budget (steps x batch x sequence length). Every row is
evaluated on the domain's held-out files and on the Wikipedia held-out split.

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
    train_iters: int = 20
    """Mask-learning steps of the general (Wikipedia) mask: half the demo's 40, to keep the
    study's three mask-learning runs near the demo's run time."""
    eval_interval: int = 0
    """Held-out PPL every N mask-learning steps (0: only after the last step)."""
    domain: str = "python-stdlib"
    """The domain: its training split is tokenised for calibration and mask learning, and
    ``tools/eval_ppl.py --data DOMAIN`` reads its held-out split."""
    domain_iters: int = 10
    """Mask-learning steps of each domain mask (both get the same steps, batch and length)."""
    dense: str | None = None
    """A converted dense checkpoint of the embedded model to reuse (default: convert it)."""
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

    def learned(self, run: Path, label: str, own_data: str, iters: int) -> dict[str, float]:
        """A learned mask's PPL on both sets: the trainer's final evaluation for its own data."""
        other = WIKI if own_data == self.cfg.domain else self.cfg.domain
        return {own_data: self.learned_ppl(run, train_iters=iters),
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
        lines = [f"| row | {cfg.domain} held-out PPL | Wikipedia held-out PPL |", "|---|---|---|"]
        lines += [f"| {name} | {ppl[cfg.domain]:.2f} | {ppl[WIKI]:.2f} |"
                  for name, ppl in rows.items()]
        ours = rows["MaskLLM domain, general-mask prior"][cfg.domain]
        rivals = [rows[k][cfg.domain] for k in ("MaskLLM general (Wikipedia)",
                                                "MaskLLM domain, SparseGPT prior")]
        lines.append(f"\nDomain masks: {cfg.domain_iters} steps x {cfg.global_batch_size} x "
                     f"{cfg.seq_length} tokens ({tokens} tokens) each; general mask: "
                     f"{cfg.train_iters} steps on Wikipedia. PPL over {cfg.eval_windows} windows "
                     f"of {cfg.seq_length} tokens. General-mask prior beats both rivals on the "
                     f"domain: {'yes' if ours < min(rivals) else 'no'}.")
        return "\n".join(lines)
