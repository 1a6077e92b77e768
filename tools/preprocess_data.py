#!/usr/bin/env python
"""Tokenise text into megatron-core .bin/.idx files, one EOD token after each document.

    python tools/preprocess_data.py --input embedded-train --tokenizer embedded --out data/wiki_train
    python tools/preprocess_data.py --input c4.jsonl --json-key text --tokenizer DIR --out data/c4
    python tools/preprocess_data.py --input python-stdlib --tokenizer embedded --out data/py_train
    python tools/preprocess_data.py --input 'src/**/*.py' --split train --tokenizer DIR --out data/src

python-stdlib and globs are one document per file, split by file (megatron/sparse/data/sources.py);
python-stdlib defaults to its training split (the evaluation tools read its held-out split), a glob
to all the files it matches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import quiet_library_notices, run_main  # noqa: E402

quiet_library_notices()  # megatron-core warns at import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True,
                   help="embedded-train, embedded-eval, python-stdlib (standard-library source), "
                        "a quoted glob of files ('DIR/**/*.py', one document per file), a text "
                        "file (documents separated by two blank lines) or a .jsonl/.jsonl.gz file")
    p.add_argument("--split", choices=("train", "heldout", "all"), default=None,
                   help="by-file split of python-stdlib or a glob (default: train for "
                        "python-stdlib, all for a glob)")
    p.add_argument("--tokenizer", required=True,
                   help="embedded, a HF tokenizer directory/id or a sentencepiece .model")
    p.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin, PREFIX.idx)")
    p.add_argument("--json-key", default=None, help="text field of JSON lines (default: text)")
    p.add_argument("--log-every", type=int, default=1000, help="progress every N documents")
    ns = p.parse_args()

    from megatron.sparse.data.corpus import embedded_articles, read_documents
    from megatron.sparse.data.indexed import write_indexed
    from megatron.sparse.data.sources import STDLIB, file_documents, is_glob
    from megatron.sparse.data.tokenizer import encode, eod_id, load_tokenizer

    file_set = ns.input == STDLIB or is_glob(ns.input)
    if ns.split is not None and not file_set:
        raise ValueError(f"--split applies to python-stdlib and globs, not --input {ns.input}")
    if ns.input.startswith("embedded-"):
        documents = embedded_articles(ns.input[len("embedded-"):])
    elif file_set:
        default = "train" if ns.input == STDLIB else "all"
        documents = file_documents(ns.input, ns.split or default)
    else:
        documents = read_documents(ns.input, json_key=ns.json_key)
    tokenizer = load_tokenizer(ns.tokenizer)
    start = time.perf_counter()
    stats = write_indexed(ns.out, documents, encode=lambda t: encode(tokenizer, t),
                          eod=eod_id(tokenizer), vocab_size=len(tokenizer),
                          log_every=ns.log_every)
    print(f"wrote {ns.out}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens in "
          f"{time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    run_main(main)
