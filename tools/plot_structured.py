#!/usr/bin/env python
"""Plot per-layer kept widths of tools/prune_structured.py runs into a PNG.

    python tools/plot_structured.py --run "Wanda-sp=OUT1/structured.json" \\
        --run "learned=OUT2/structured.json" --out widths.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.sparse.cli import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True,
                   help="LABEL=PATH of a structured.json (repeat for several runs)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--title", default="", help="figure title")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    from megatron.sparse.structured.plot import plot_widths

    runs = {}
    for spec in ns.run:
        label, sep, path = spec.partition("=")
        if not sep or not os.path.isfile(path):
            raise ValueError(f"--run {spec!r}: expected LABEL=PATH of an existing structured.json")
        runs[label] = path
    plot_widths(runs, ns.out, title=ns.title)
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    run_main(main)
