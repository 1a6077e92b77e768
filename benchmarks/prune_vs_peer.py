"""Our SparseGPT + weight update vs llm-compressor's, on the same windows and the same evaluator.

Used by ``benchmarks/bench_prune.py --peer llmcompressor``. Steps, all in ``--work-dir``
(prepared once, reused by later runs):

1. the dense embedded model (SmolLM2-135M) as a Hugging Face safetensors directory, converted
   from it the dense megatron-sparse checkpoint, and ``preprocess_data.py --input
   embedded-train``; the first ``n x L`` tokens of that corpus, read as non-overlapping windows
   exactly as ``prune_oneshot.py --calib-data PREFIX`` reads them, go to ``calib.npy``;
2. per repeat, back to back in fresh processes: ours (``tools/prune_oneshot.py --method sparsegpt
   --update-weight --calib-data PREFIX``) and the peer (``benchmarks/peer_llmcompressor.py`` in
   the peer's Python, reading ``calib.npy``). Each process loads the dense model, calibrates,
   prunes and saves the pruned model; its wall time and its peak RSS (``ru_maxrss`` from
   ``wait4``: the whole process, so load + calibrate + prune + save, no evaluation) are recorded;
3. ours is exported to Hugging Face (``tools/export_hf.py``) and both pruned models (and the
   dense one) are evaluated here by one evaluator, :func:`hf_perplexity` on the held-out
   embedded text in the same ``L``-token windows, after checking both are 2:4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "peer_llmcompressor.py"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed_child(cmd: list[str], *, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: wall and CPU seconds, peak RSS (MiB), last stdout line."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        raise SystemExit(f"{script} failed (exit {proc.returncode}); see {log}")
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    return {"seconds": round(seconds, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "last_line": lines[-1] if lines else ""}


def peer_available(peer_python: str) -> str | None:
    """llm-compressor's version in ``peer_python``, or None when it does not import there."""
    try:
        out = subprocess.run([peer_python, str(PEER_SCRIPT), "--check"], capture_output=True,
                             text=True, timeout=600)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["llmcompressor"]


def _tool(name: str, *args: str, log: Path) -> None:
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "tools" / name), *args]
    with open(log, "w") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"tools/{name} failed; see {log}")


def prepare(work: Path, *, samples: int, seq_length: int) -> dict[str, Path]:
    """Dense HF dir, dense checkpoint, calibration prefix and ``calib.npy`` (reused if present)."""
    import numpy as np

    from megatron.sparse.data.indexed import read_token_windows

    work.mkdir(parents=True, exist_ok=True)
    paths = {"hf_dense": work / "hf_dense", "dense": work / "dense", "calib": work / "calib_train",
             "tokens": work / f"calib_{samples}x{seq_length}.npy"}
    if not (paths["hf_dense"] / "model.safetensors").is_file():
        from megatron.sparse.embedded import load_embedded_model, load_embedded_tokenizer

        tmp = work / "hf_dense.tmp"
        load_embedded_model().save_pretrained(tmp)
        load_embedded_tokenizer().save_pretrained(tmp)
        os.replace(tmp, paths["hf_dense"])
    if not (paths["dense"] / "latest_checkpointed_iteration.txt").is_file():
        _tool("convert_hf_to_megatron.py", "--hf", str(paths["hf_dense"]), "--out",
              str(paths["dense"]), "--overwrite", log=work / "convert.log")
    if not Path(f"{paths['calib']}.idx").is_file():
        _tool("preprocess_data.py", "--input", "embedded-train", "--tokenizer", "embedded",
              "--out", str(paths["calib"]), log=work / "preprocess.log")
    windows = read_token_windows(str(paths["calib"]), seq_length, num_windows=samples)
    np.save(paths["tokens"], windows.numpy())
    return paths


def run_ours(paths: dict[str, Path], work: Path, *, samples: int, seq_length: int,
             micro_batch_size: int | None) -> dict:
    out = work / "ours_pruned"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "tools" / "prune_oneshot.py"),
           "--load", str(paths["dense"]), "--method", "sparsegpt", "--update-weight",
           "--calib-data", str(paths["calib"]), "--calib-samples", str(samples),
           "--seq-length", str(seq_length), "--save", str(out)]
    if micro_batch_size:
        cmd += ["--micro-batch-size", str(micro_batch_size)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    row = timed_child(cmd, log=work / "ours.log", env=env)
    detail = row.pop("last_line")
    return {"side": "ours", **row, "detail": detail}


def run_peer(paths: dict[str, Path], work: Path, *, peer_python: str, batch_size: int) -> dict:
    out = work / "peer_pruned"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [peer_python, str(PEER_SCRIPT), "--model", str(paths["hf_dense"]), "--tokens",
           str(paths["tokens"]), "--out", str(out), "--batch-size", str(batch_size)]
    row = timed_child(cmd, log=work / "peer.log")
    detail = json.loads(row.pop("last_line"))
    return {"side": "llmcompressor", **row, "detail": detail}


def _projection_masks(model) -> dict[str, "torch.Tensor"]:
    """Nonzero patterns of the projections; at most 2 of every 4 (dead inputs may zero more)."""
    masks = {}
    for name, param in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            mask = param.detach() != 0
            if (mask.reshape(mask.shape[0], -1, 4).sum(dim=-1) > 2).any():
                raise SystemExit(f"{name} is not 2:4 sparse")
            masks[name] = mask
    return masks


def evaluate(paths: dict[str, Path], work: Path, *, seq_length: int,
             max_windows: int | None) -> dict:
    """Export ours, then one evaluator for dense, ours and peer; plus their mask agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.sparse.data.tokenizer import load_tokenizer
    from megatron.sparse.eval.datasets import eval_windows
    from megatron.sparse.eval.hf_perplexity import hf_perplexity

    _tool("export_hf.py", "--load", str(work / "ours_pruned"), "--out", str(work / "ours_hf"),
          "--overwrite", log=work / "export.log")
    windows = eval_windows("embedded", load_tokenizer(str(paths["hf_dense"])),
                           seq_length=seq_length, max_windows=max_windows)
    result, masks = {"eval_windows": list(windows.shape)}, {}
    for side, path in (("dense", paths["hf_dense"]), ("ours", work / "ours_hf"),
                       ("llmcompressor", work / "peer_pruned")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if side != "dense":
            masks[side] = _projection_masks(model)
        result[f"ppl_{side}"] = round(hf_perplexity(model, windows).ppl, 4)
        del model
    same = sum(int((masks["ours"][k] == masks["llmcompressor"][k]).sum()) for k in masks["ours"])
    total = sum(m.numel() for m in masks["ours"].values())
    result["mask_agreement"] = round(same / total, 4)
    return result
