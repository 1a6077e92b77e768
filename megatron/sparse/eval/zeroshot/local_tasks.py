"""Offline zero-shot tasks in lm-eval's YAML task format, built from held-out text.

Two tasks per source, each a ``<prefix>_<kind>.yaml`` next to its ``<prefix>_<kind>.jsonl``
(``dataset_path: json`` with a local data file, so nothing is downloaded):

- ``<prefix>_cloze``: LAMBADA-style last-word prediction. The target is a word of at least
  ``MIN_TARGET_CHARS`` letters that already occurs among the ``CLOZE_CONTEXT`` words before it
  (so a good model can recover it from the context, as in LAMBADA); the context is those words.
  The model must give the word greedily (``acc``: every token the argmax); the word perplexity
  is reported too. Targets are at least ``CLOZE_CONTEXT`` words apart, so no context holds an
  earlier example's target.
- ``<prefix>_choice``: "which continuation is the real one". A context of ``CHOICE_CONTEXT``
  words and ``CHOICES`` candidate continuations of ``CHOICE_WORDS`` words: the real one and
  continuations taken from passages of *other* documents at the same word offset, so every
  candidate is fluent text of the same position and length (``acc``, ``acc_norm``).

Passages are windows of each document's whitespace-split words; examples are drawn from them
with a seeded generator, so a (texts, seed, n_examples) triple always gives the
same files.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

CLOZE_CONTEXT = 20
"""Context words before a cloze target."""
MIN_TARGET_CHARS = 4
CHOICE_CONTEXT = 12
"""Context words of a choice item."""
CHOICE_WORDS = 5
"""Words per candidate continuation."""
CHOICES = 4
LOCAL_KINDS = ("cloze", "choice")

_TARGET = re.compile(r"^([A-Za-z]+)[.,;:!?\"')]*$")
# Keys every task file needs, and per output type the templates that must name data fields.
REQUIRED_KEYS = ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target")
_TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")


def _passages(texts: list[str], length: int) -> list[tuple[int, list[str]]]:
    """``(document index, words)`` of every full non-overlapping ``length``-word window."""
    out = []
    for doc, text in enumerate(texts):
        words = text.split()
        out += [(doc, words[i:i + length]) for i in range(0, len(words) - length + 1, length)]
    return out


def _bare(word: str) -> str | None:
    match = _TARGET.match(word)
    return match.group(1) if match and len(match.group(1)) >= MIN_TARGET_CHARS else None


def _sample(pool: list, n: int, rng: random.Random, what: str) -> list:
    if len(pool) < n:
        raise ValueError(f"the held-out text gives only {len(pool)} {what} passages, fewer than "
                         f"n_examples={n}; pass more text or a smaller n_examples")
    return rng.sample(pool, n)


def cloze_examples(texts: list[str], n_examples: int, rng: random.Random) -> list[dict]:
    """``n_examples`` last-word cloze items (``context``, ``target``, ``doc``)."""
    pool = []
    for doc, text in enumerate(texts):
        words = text.split()
        nxt = CLOZE_CONTEXT
        for t in range(CLOZE_CONTEXT, len(words)):
            target = _bare(words[t]) if t >= nxt else None
            context = words[t - CLOZE_CONTEXT:t]
            if target and target in {_TARGET.sub(r"\1", w) for w in context}:
                pool.append({"context": " ".join(context), "target": target, "doc": doc})
                nxt = t + CLOZE_CONTEXT
    return _sample(pool, n_examples, rng, "cloze")


def choice_examples(texts: list[str], n_examples: int, rng: random.Random) -> list[dict]:
    """``n_examples`` real-continuation items (``context``, ``choices``, ``label``, ``doc``)."""
    pool = _passages(texts, CHOICE_CONTEXT + CHOICE_WORDS)
    if len({doc for doc, _ in pool}) < 2:
        raise ValueError("the choice task takes its distractors from other documents: pass at "
                         "least two documents with a full passage each")
    items = []
    for doc, words in _sample(pool, n_examples, rng, "choice"):
        others = [w for d, w in pool if d != doc]
        picks = rng.sample(others, min(CHOICES - 1, len(others)))
        choices = [" ".join(words[CHOICE_CONTEXT:])]
        choices += [" ".join(w[CHOICE_CONTEXT:]) for w in picks]
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append({"context": " ".join(words[:CHOICE_CONTEXT]),
                      "choices": [choices[i] for i in order], "label": order.index(0),
                      "doc": doc})
    return items


def _task_config(name: str, kind: str, data_file: Path) -> dict:
    cfg = {"task": name, "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
           "test_split": "test", "doc_to_text": "{{context}}"}
    if kind == "cloze":
        # lm-eval joins a loglikelihood task's context and target as they are (target_delimiter
        # only applies to multiple_choice): the word's leading space belongs to the target
        cfg |= {"output_type": "loglikelihood", "doc_to_target": " {{target}}",
                "metric_list": [
                    {"metric": "perplexity", "aggregation": "perplexity",
                     "higher_is_better": False},
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        cfg |= {"output_type": "multiple_choice", "doc_to_choice": "choices",
                "doc_to_target": "label",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return cfg | {"metadata": {"version": 1.0}}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary name and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_local_tasks(texts: list[str], out_dir: Path, *, prefix: str, n_examples: int,
                      seed: int) -> list[str]:
    """Write the cloze and choice tasks of ``texts`` under ``out_dir``; returns the task names.

    Pass ``out_dir`` to lm-eval as an include path (``TaskManager(include_path=out_dir)``) and
    the names as tasks.
    """
    import yaml

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise ValueError(f"task prefix {prefix!r}: use letters, digits and underscores")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {"cloze": cloze_examples, "choice": choice_examples}
    names = []
    for kind in LOCAL_KINDS:
        name = f"{prefix}_{kind}"
        rows = builders[kind](texts, n_examples, random.Random(f"{seed}:{kind}"))
        data_file = out_dir / f"{name}.jsonl"
        write_text_atomic(data_file, "".join(json.dumps(r) + "\n" for r in rows))
        write_text_atomic(out_dir / f"{name}.yaml",
                      yaml.safe_dump(_task_config(name, kind, data_file), sort_keys=False))
        names.append(name)
    return names


def validate_task_file(path: Path) -> str:
    """Check a local YAML task file (keys, data file, fields its templates use); its name.

    Raises a one-line ``ValueError`` naming the missing piece.
    """
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"task file {path}: not valid YAML ({str(exc).splitlines()[0]})") \
            from None
    if not isinstance(cfg, dict):
        raise ValueError(f"task file {path}: expected a mapping of task settings")
    if "include" in cfg:  # derived from another config: lm-eval resolves it
        return str(cfg.get("task", path.stem))
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if cfg.get("output_type") == "multiple_choice" and "doc_to_choice" not in cfg:
        missing.append("doc_to_choice")
    if missing:
        raise ValueError(f"task file {path}: missing field(s) {', '.join(missing)}; see "
                         f"docs/evaluation.md for the local task format")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    if cfg["dataset_path"] == "json" and files:
        _check_data_files(path, cfg, files)
    return str(cfg["task"])


def _check_data_files(path: Path, cfg: dict, files) -> None:
    fields = set()
    for key in _TEMPLATE_KEYS:
        value = cfg.get(key)
        if isinstance(value, str):  # a bare field name, or a Jinja template naming fields
            fields |= ({value} if value.isidentifier()
                       else set(re.findall(r"{{\s*([A-Za-z_]\w*)\s*}}", value)))
    for split, data in (files.items() if isinstance(files, dict) else [("data", files)]):
        for item in ([data] if isinstance(data, str) else data):
            data_path = Path(item) if Path(item).is_absolute() else path.parent / item
            if not data_path.is_file():
                raise ValueError(f"task file {path}: {split} data file {data_path} does not "
                                 f"exist")
            with open(data_path, encoding="utf-8") as f:
                first = f.readline()
            try:
                row = json.loads(first)
            except json.JSONDecodeError:
                raise ValueError(f"task file {path}: {data_path} is not JSON lines") from None
            absent = sorted(fields - set(row))
            if absent:
                raise ValueError(f"task file {path}: {data_path} rows lack the field(s) "
                                 f"{', '.join(absent)} its templates use")
