"""Per-layer kept widths of structural-pruning results as a PNG (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_widths(summaries: dict[str, str | Path], out: str | Path, *, title: str = "") -> None:
    """One line per run: MLP width and KV groups kept per layer, from ``structured.json`` files.

    ``summaries`` maps a legend label to a ``structured.json`` path (tools/prune_structured.py).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for label, path in summaries.items():
        info = json.loads(Path(path).read_text())
        layers = range(len(info["channels_per_layer"]))
        top.plot(layers, info["channels_per_layer"], marker="o", ms=3, label=label)
        bottom.plot(layers, info["kv_groups_per_layer"], marker="o", ms=3, label=label)
    top.set_ylabel("MLP channels kept")
    bottom.set_ylabel("KV groups kept")
    bottom.set_xlabel("layer")
    top.legend(fontsize=8)
    if title:
        top.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
