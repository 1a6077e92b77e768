"""Text and JSON views of :class:`MemoryEstimate` (the CLI's output)."""

from __future__ import annotations

from megatron.sparse.memory.estimate import MemoryEstimate

GIB = 2**30
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "buffers", "peak", "checkpoint")


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(rows: list[tuple[str, MemoryEstimate]]) -> str:
    """One line per ``(label, estimate)``, figures in GiB."""
    width = max(len("tool"), *(len(label) for label, _ in rows))
    head = f"{'tool':<{width}}" + "".join(f"{c:>13}" for c in COLUMNS) + "  per"
    lines = [head, "-" * len(head)]
    for label, e in rows:
        values = e.to_dict()
        lines.append(f"{label:<{width}}" + "".join(f"{gib(values[c]):>13}" for c in COLUMNS)
                     + ("  GPU" if e.per_gpu else "  host process"))
    lines.append("GiB (2^30 bytes); peak = max(parameters + gradients + optimizer + activations "
                 "+ buffers, parameters + load transient, parameters + save transient); checkpoint = "
                 "bytes "
                 "written (whole model)")
    return "\n".join(lines)
