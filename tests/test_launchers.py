"""Every launcher under scripts/ with DRY_RUN=1: its plan, TP check and memory, on CPU."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.tools import run_tool_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# launcher -> (arguments, extra environment, expected tool, expected TP)
LAUNCHERS = {
    "convert_llama2_7b_tp8.sh": ((), {}, "convert", 8),
    "convert_llama3_8b_tp8.sh": ((), {}, "convert", 8),
    "convert_llama3.1_8b_tp8.sh": ((), {}, "convert", 8),
    "run_llama2_7b_prune_tp8.sh": (("sparsegpt",), {}, "prune", 8),
    "run_llama3_8b_prune_tp8.sh": (("wanda",), {}, "prune", 8),
    "run_llama3.1_8b_prune_tp8.sh": (("magnitude",), {}, "prune", 8),
    "_prune_tp8.sh": (("sparsegpt", "--update-weight"), {"MODEL_TAG": "llama2-7b"}, "prune", 8),
    "train_mask_llama2_7b_tp8.sh": ((), {}, "train_mask", 8),
    "train_mask_llama3_8b_tp8.sh": ((), {}, "train_mask", 8),
    "train_mask_llama3.1_8b_tp8.sh": ((), {}, "train_mask", 8),
    "_train_mask_tp8.sh": ((), {"MODEL_TAG": "llama3-8b"}, "train_mask", 8),
    "train_ast_llama2_7b_tp8.sh": ((), {}, "train_ast", 8),
    "train_ast_llama3_8b_tp8.sh": ((), {}, "train_ast", 8),
    "train_ast_llama3.1_8b_tp8.sh": ((), {}, "train_ast", 8),
    "_train_ast_tp8.sh": ((), {"MODEL_TAG": "llama3.1-8b"}, "train_ast", 8),
    "evaluate_llama2_7b_wikitext2.sh": ((), {}, "eval", 8),
    "evaluate_llama3_8b_wikitext2.sh": ((), {}, "eval", 8),
    "evaluate_llama3.1_8b_wikitext2.sh": ((), {}, "eval", 8),
    "evaluate_zeroshot_llama2_7b.sh": ((), {}, "eval", 8),
    "evaluate_zeroshot_llama3_8b.sh": (("--limit", "100"), {}, "eval", 8),
    "evaluate_zeroshot_llama3.1_8b.sh": ((), {"TASKS": "local"}, "eval", 8),
    "export_llama2_7b_hf.sh": ((), {"DENSE": "/models/none"}, "export", 1),
    "slurm/train_mask.sbatch": ((), {"SLURM_NNODES": "2"}, "train_mask", 8),
    "slurm/train_ast.sbatch": ((), {"SLURM_NNODES": "2"}, "train_ast", 8),
    "preprocess_c4.sh": ((), {}, None, None),
}
_CLEAN = ("CKPT", "DATA", "SAVE", "PRIOR", "CALIB_DATA", "LOAD", "TP", "NPROC", "NNODES",
          "MODEL_TAG", "HF", "OUT", "C4_DIR", "TOKENIZER", "SLURM_NNODES", "DENSE", "TASKS",
          "BATCH_SIZE")


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    environ.update(DRY_RUN="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_every_launcher_is_covered():
    found = {str(p.relative_to(SCRIPTS)) for p in SCRIPTS.rglob("*")
             if p.suffix in (".sh", ".sbatch") and p.name != "_launch.sh"}
    assert found == set(LAUNCHERS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_launcher_dry_run_prints_its_plan(script):
    args, env, tool, tp = LAUNCHERS[script]
    result = dry_run(script, *args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "command: " in out
    if tool is None:
        assert "plan: tokenise" in out
        return
    assert re.search(rf"^plan: {tool} of \S+: TP {tp} x DP \d+ = world size \d+", out, re.M), out
    assert re.search(r"^memory: peak \d+\.\d\d GiB per (GPU|host process), checkpoint", out,
                     re.M), out
    assert re.search(rf"^check: TP {tp} divides \d+ attention heads, \d+ KV heads", out, re.M)
    assert "missing (not checked in a dry run)" in out  # unset CKPT etc. are reported
    if script in ("slurm/train_mask.sbatch", "slurm/train_ast.sbatch"):
        assert "world size 16 (2 node(s) x 8 process(es))" in out


def test_broken_launcher_fails_with_one_line_error():
    """TP overridden to a size that does not divide LLaMA-2 7B's 32 heads."""
    result = dry_run("train_mask_llama2_7b_tp8.sh", TP="3", NPROC="3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: tensor-parallel size 3 does not divide the attention heads (32); "
                     "pick a TP size that divides it"], result.stderr


def test_plan_rejects_tp_not_dividing_the_world_size():
    result = run_tool_in_process(
        "estimate_memory", "--plan", "--model", "llama2-7b", "--", "torchrun",
        "--nproc-per-node", "8", "tools/train_mask.py", "--tp", "16", "--load", "x")
    assert result.returncode == 2
    assert "does not divide" in result.stderr


def test_plan_reads_settings_from_the_command():
    from megatron.sparse.memory.plan import memory_config, plan_from_command

    plan = plan_from_command(["torchrun", "--nproc-per-node", "4", "--nnodes", "2",
                              "tools/prune_oneshot.py", "--load", "c", "--method", "wanda",
                              "--seq-length", "2048", "--calib-samples", "64", "--bf16"])
    cfg = memory_config(plan, "llama3-8b")
    assert (plan.tool, plan.world, cfg.tp, cfg.dp) == ("prune", 8, 8, 1)  # TP = world size
    assert (cfg.seq_length, cfg.calib_samples, cfg.dtype, cfg.prune_method) == \
        (2048, 64, "bf16", "wanda")
