"""Dry run of a launcher: the settings it resolved, read back from the command it would run.

A launcher under ``scripts/`` with ``DRY_RUN=1`` passes its model tag and its final command line
(``torchrun ... tools/X.py FLAGS`` or ``python tools/X.py FLAGS``) to
``tools/estimate_memory.py --plan``; :func:`plan_from_command` recovers the tool, TP, world size,
micro batch, sequence length and dtype from it exactly as the tool would parse them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron.sparse.memory.estimate import MemoryConfig

_TOOL_OF_SCRIPT = {"convert_hf_to_megatron.py": "convert", "prune_oneshot.py": "prune",
                   "train_mask.py": "train_mask", "train_ast.py": "train_ast",
                   "eval_ppl.py": "eval", "eval_zeroshot.py": "eval", "export_hf.py": "export"}
_PATH_FLAGS = ("--load", "--hf", "--data", "--calib-data", "--prior", "--save", "--out",
               "--eval-data", "--mask-file")
_SPECIAL = {"embedded", "wikitext2"}


@dataclass
class Plan:
    """What a launcher would run."""

    tool: str
    flags: dict[str, str]
    """The tool's ``--flag value`` pairs (a bare flag maps to "")."""
    nproc: int
    nnodes: int
    command: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def tp(self) -> int:
        return int(self.flags.get("--tp") or (1 if self.tool in ("convert", "export")
                                              else self.world))

    def paths(self) -> list[tuple[str, str, bool]]:
        """``(flag, path, exists)`` for the path arguments (outputs: whether they exist yet)."""
        out = []
        for flag in _PATH_FLAGS:
            value = self.flags.get(flag)
            if value and value not in _SPECIAL:
                exists = any(os.path.exists(value + ext) for ext in ("", ".bin", ".idx"))
                out.append((flag, value, exists))
        return out


def _flags(argv: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key, _, inline = argv[i].partition("=")
            if inline:
                flags[key] = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                flags[key] = argv[i + 1]
                i += 1
            else:
                flags[key] = ""
        i += 1
    return flags


def plan_from_command(command: list[str]) -> Plan:
    """Parse ``torchrun [opts] tools/X.py FLAGS`` or ``python tools/X.py FLAGS``."""
    script = next((i for i, a in enumerate(command)
                   if os.path.basename(a) in _TOOL_OF_SCRIPT), None)
    if script is None:
        raise ValueError(f"the dry-run command runs none of {', '.join(_TOOL_OF_SCRIPT)}: "
                         f"{' '.join(command)}")
    launcher = _flags(command[:script])
    nproc = int(launcher.get("--nproc-per-node") or launcher.get("--nproc_per_node") or 1)
    nnodes = int(launcher.get("--nnodes") or 1)
    tool = _TOOL_OF_SCRIPT[os.path.basename(command[script])]
    return Plan(tool=tool, flags=_flags(command[script + 1:]), nproc=nproc, nnodes=nnodes,
                command=list(command))


def memory_config(plan: Plan, model) -> MemoryConfig:
    """The :class:`MemoryConfig` of what the planned tool holds.

    The trainer builds its model in fp32; pruning and evaluation hold fp32 unless ``--bf16``;
    conversion and export keep the checkpoint's dtype (bf16 assumed for the presets).
    """
    f, tool = plan.flags, plan.tool
    if tool in ("train_mask", "train_ast"):
        dtype = "fp32"
    elif tool in ("prune", "eval"):
        dtype = "bf16" if "--bf16" in f else "fp32"
    else:
        dtype = "bf16"
    seq = int(f.get("--seq-length") or 4096)
    mb = int(f.get("--micro-batch-size") or (4 if tool == "prune" else 1))
    cfg = MemoryConfig(model=model, tool=tool, tp=plan.tp, dp=max(plan.world // plan.tp, 1),
                       micro_batch=1 if tool == "prune" else mb, seq_length=seq, dtype=dtype,
                       prune_method=f.get("--method") or "sparsegpt",
                       calib_samples=int(f.get("--calib-samples") or 128),
                       prune_micro_batch=mb, regulariser=float(f.get("--reg-lambda") or 1e-5) > 0,
                       kd_teacher=float(f.get("--kd-weight") or 0.5) > 0)
    cfg.validate()
    if tool not in ("convert", "export") and plan.world % plan.tp != 0:
        raise ValueError(f"--tp {plan.tp} does not divide the world size {plan.world} "
                         f"(NPROC x NNODES); set TP to a divisor of it")
    return cfg
