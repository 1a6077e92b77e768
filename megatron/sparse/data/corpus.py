"""Text sources: the embedded Wikipedia sample, plain text files and JSON-lines files.

The embedded corpus is the English Wikipedia test dump shipped in the ``gensim`` wheel
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``):
main-namespace articles, redirects dropped, markup removed with gensim's ``filter_wiki`` (plus its leftover ''bold'' quotes). The split
is by article in dump order and deterministic: every 10th article (index 9, 19, ...) is held out
for evaluation, the rest is training/calibration text.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterator

EMBEDDED_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_EVERY = 10
SPLITS = ("train", "eval")


def embedded_dump_path() -> Path:
    """Location of the Wikipedia dump inside the installed gensim package.

    Found without importing gensim (~3 s): only a cache miss parses the dump with it.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded corpus needs gensim: pip install "
                                "'megatron-sparse[embedded]'")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / EMBEDDED_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but its test data {path} is missing")
    return path


@lru_cache(maxsize=1)
def _all_articles() -> tuple[str, ...]:
    """All cleaned main-namespace articles in dump order (cached on disk after the first run)."""
    from importlib.metadata import version

    from megatron.sparse.cache import cached_entry, source_key

    dump = embedded_dump_path()
    saved = cached_entry("wiki-articles", source_key(dump, version("gensim")),
                         lambda d: (d / "articles.json").write_text(
                             json.dumps(_clean_articles(dump)), encoding="utf-8"))
    if saved is None:
        return tuple(_clean_articles(dump))
    return tuple(json.loads((saved / "articles.json").read_text(encoding="utf-8")))


def _clean_articles(path: Path) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path, "rb") as dump:
        for title, text, _page_id in extract_pages(dump, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text).replace("'''", "").replace("''", "")
            body = "\n".join(line.strip() for line in plain.splitlines() if line.strip())
            if body:
                articles.append(f"{title}\n\n{body}")
    return articles


def embedded_articles(split: str) -> list[str]:
    """Articles of the embedded corpus for ``split`` in ("train", "eval")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    held_out = split == "eval"
    return [a for i, a in enumerate(_all_articles()) if ((i % EVAL_EVERY) == EVAL_EVERY - 1)
            == held_out]


def read_documents(path: str, *, json_key: str | None = None) -> Iterator[str]:
    """Documents of a file: one per line of a ``.jsonl``/``.json`` (``json_key``, default
    ``text``), or the whole text of any other file split on blank-line-separated paragraphs
    blocks (``.gz`` files are read compressed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    opener = __import__("gzip").open if p.suffix == ".gz" else open
    stem_suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    is_json = json_key is not None or stem_suffix in (".jsonl", ".json")
    with opener(p, "rt", encoding="utf-8") as f:
        if is_json:
            key = json_key or "text"
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if key not in record:
                    raise ValueError(f"{path}:{n} has no key {key!r} (use --json-key)")
                yield record[key]
        else:
            for block in f.read().split("\n\n\n"):
                if block.strip():
                    yield block
