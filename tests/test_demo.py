"""The README demo end to end on the embedded model, at a reduced budget (slow).

Runs ``tools/demo.py`` itself (the command users type) with small settings and checks what it
promises: the PPL table with every method, the curves PNG, and an HF export whose perplexity,
re-measured with transformers alone, equals the Megatron-side perplexity of the learned masks.
The work directory starts with the session's converted model (``embedded_dense``, the same tool
the demo's first stage runs), which the demo takes as done, as when it resumes.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_demo_pipeline_reduced_budget(embedded_dense, tmp_path):
    work = tmp_path / "demo"
    shutil.copytree(embedded_dense, work / "dense")
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--work-dir", str(work),
           "--seq-length", "64", "--calib-samples", "4", "--eval-windows", "3",
           "--train-iters", "2", "--global-batch-size", "2", "--micro-batch-size", "1",
           "--eval-interval", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = (work / "results.md").read_text()
    ppl = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|$", table, flags=re.M))
    assert set(ppl) == {"dense", "magnitude", "Wanda", "SparseGPT", "MaskLLM", "AST"}, table
    assert float(ppl["dense"]) < min(float(v) for k, v in ppl.items() if k != "dense")
    assert "(MaskLLM - dense) / (SparseGPT - dense)" in table
    assert "(AST - dense) / (SparseGPT - dense)" in table
    assert (work / "maskllm_curves.png").read_bytes()[:4] == b"\x89PNG"

    metrics = (work / "maskllm" / "metrics.jsonl").read_text().splitlines()
    megatron_ppl = [r for r in map(json.loads, metrics) if "eval_ppl" in r][-1]["eval_ppl"]
    assert abs(float(ppl["MaskLLM"]) - megatron_ppl) <= 0.01, (ppl["MaskLLM"], megatron_ppl)
    for cache in ("hf_mask_ppl.json", "hf_export_ppl.json"):
        hf_ppl = json.loads((work / cache).read_text())["ppl"]
        assert abs(hf_ppl - megatron_ppl) <= 1e-3 * megatron_ppl, (cache, hf_ppl, megatron_ppl)
    with np.load(work / "hf_maskllm" / "masks.npz", allow_pickle=False) as masks:
        assert len(masks.files) == 30 * 7
    assert (work / "hf_maskllm" / "config.json").is_file()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # stages cached
    assert again.returncode == 0 and "$ " not in again.stdout, again.stdout[-2000:]
