"""Task resolution, one lm-eval run, the results table and the JSON report.

Task specs (``--tasks``, comma separated):

- ``local``: the embedded held-out tasks ``embedded_cloze`` and ``embedded_choice`` (built from
  the held-out split of the embedded corpus; either name also works alone);
- a path to a YAML task file in lm-eval's format (checked by
  :func:`~megatron.sparse.eval.zeroshot.local_tasks.validate_task_file`; its folder becomes an
  include path);
- any lm-eval registry task or group (``hellaswag``, ``piqa``, ...; their data is downloaded, so
  they need the network or a filled ``HF_DATASETS_CACHE``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron.sparse.eval.zeroshot.local_tasks import (LOCAL_KINDS, build_local_tasks,
                                                       validate_task_file, write_text_atomic)

EMBEDDED_PREFIX = "embedded"
EMBEDDED_TASKS = tuple(f"{EMBEDDED_PREFIX}_{kind}" for kind in LOCAL_KINDS)
PAPER_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "rte",
               "openbookqa")
"""The zero-shot task list of the MaskLLM / SparseGPT / Wanda papers."""


@dataclass
class TaskPlan:
    """What to hand lm-eval: task names and the folders holding local task files."""

    names: list[str]
    include_paths: list[str] = field(default_factory=list)
    embedded: list[str] = field(default_factory=list)
    """The embedded held-out tasks requested (built by :func:`build_embedded_tasks`)."""
    registry: bool = False
    """Whether lm-eval's own tasks are needed (indexing them takes seconds)."""


def parse_tasks(spec: str) -> TaskPlan:
    """Split ``--tasks`` and check every entry; one-line ``ValueError`` for an unknown one."""
    entries = [s.strip() for s in spec.split(",") if s.strip()]
    if not entries:
        raise ValueError("--tasks is empty; name tasks, e.g. --tasks local or --tasks hellaswag")
    plan = TaskPlan(names=[])
    registry: list[str] = []
    for entry in entries:
        if entry == "local":
            plan.embedded += [t for t in EMBEDDED_TASKS if t not in plan.embedded]
        elif entry in EMBEDDED_TASKS:
            plan.embedded += [] if entry in plan.embedded else [entry]
        elif entry.endswith((".yaml", ".yml")):
            path = Path(entry)
            if not path.is_file():
                raise ValueError(f"--tasks {entry}: task file not found")
            plan.names.append(validate_task_file(path))
            plan.include_paths.append(str(path.resolve().parent))
        else:
            registry.append(entry)
    if registry:
        known = _registry_names(plan.include_paths)
        for name in registry:
            if name not in known:
                raise ValueError(f"--tasks: unknown task {name!r}; use 'local', a task YAML "
                                 f"file, or an lm-eval task name (python -m lm_eval ls tasks)")
        plan.names += registry
        plan.registry = True
    plan.names = plan.embedded + plan.names
    return plan


def _registry_names(include_paths: list[str]) -> set[str]:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_paths or None)
    return set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)


def build_embedded_tasks(plan: TaskPlan, out_dir: Path, *, n_examples: int, seed: int) -> None:
    """Write the embedded held-out tasks into ``out_dir`` and add it to the include paths."""
    if not plan.embedded:
        return
    from megatron.sparse.data.corpus import embedded_articles

    build_local_tasks(embedded_articles("eval"), out_dir, prefix=EMBEDDED_PREFIX,
                      n_examples=n_examples, seed=seed)
    plan.include_paths.append(str(out_dir))


def check_settings(*, limit: int | None, num_fewshot: int | None) -> None:
    """One-line errors for a ``--limit`` or ``--num-fewshot`` lm-eval would misread."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (examples per task), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")


@contextlib.contextmanager
def _bootstrap_in_process():
    """Bootstrap stderrs in this process (lm-eval's ``DISABLE_MULTIPROC``): its default forks a
    ``multiprocessing.Pool`` of ``cpu_count`` copies of a process that holds the model, OpenMP
    threads and gloo groups, and such forked children can deadlock (seen: a hung test run)."""
    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC")
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


def run_tasks(lm, plan: TaskPlan, *, num_fewshot: int | None = None, limit: int | None = None,
              bootstrap_iters: int = 1000) -> dict:
    """``lm_eval.simple_evaluate`` on ``plan``; the raw lm-eval result dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    check_settings(limit=limit, num_fewshot=num_fewshot)
    tm = TaskManager(include_path=plan.include_paths or None, include_defaults=plan.registry)
    try:
        with _bootstrap_in_process():
            return simple_evaluate(model=lm, tasks=plan.names, num_fewshot=num_fewshot,
                                   limit=limit, bootstrap_iters=bootstrap_iters,
                                   task_manager=tm, log_samples=True)
    except ConnectionError as exc:
        raise ValueError(f"a task's data could not be downloaded ({exc}); registry tasks need "
                         f"the network or HF_DATASETS_CACHE; offline, use --tasks local") from None


def result_rows(results: dict) -> list[dict]:
    """``{task, metric, value, stderr}`` for every metric lm-eval reported (filter ``none``)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def per_example(results: dict) -> dict[str, list[dict]]:
    """Per task, ``{doc_id, metric: value}`` of every example (for agreement checks)."""
    out = {}
    for task, samples in (results.get("samples") or {}).items():
        metrics = [m for m in results["results"][task] if "," in m and "_stderr" not in m]
        names = {m.partition(",")[0] for m in metrics}
        out[task] = [{"doc_id": s["doc_id"], **{n: _plain(s[n]) for n in names if n in s}}
                     for s in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else value


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: task, metric, value, stderr."""
    lines = [f"{'task':<24} {'metric':<12} {'value':>10} {'stderr':>10}"]
    for r in rows:
        err = "" if r["stderr"] is None or math.isnan(r["stderr"]) else f"{r['stderr']:.4f}"
        lines.append(f"{r['task']:<24} {r['metric']:<12} {r['value']:>10.4f} {err:>10}")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as JSON through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")
