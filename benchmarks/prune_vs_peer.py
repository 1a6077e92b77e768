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
   ``wait4``: the whole process, so load + calibrate + prune + save, no evaluation; measured
   through ``child_rss.run_measured`` so the benchmark's own size does not leak in) are recorded;
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "peer_llmcompressor.py"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed_child(cmd: list[str], *, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion: wall and CPU seconds, peak RSS (MiB), last stdout line."""
    from child_rss import run_measured  # benchmarks/ is on sys.path

    with open(log, "w") as err, open(log.with_suffix(".stdout"), "w") as out:
        row = run_measured(cmd, stdout=out, stderr=err, env=env)
    if row["returncode"] != 0:
        script = next((Path(c).name for c in cmd if c.endswith(".py")), cmd[0])
        raise SystemExit(f"{script} failed (exit {row['returncode']}); see {log}")
    lines = [line for line in log.with_suffix(".stdout").read_text().splitlines() if line.strip()]
    return {"seconds": round(row["seconds"], 1), "cpu_seconds": round(row["cpu_seconds"], 1),
            "peak_rss_mib": round(row["peak_rss_bytes"] / 2**20),
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


def prepare(work: Path) -> dict[str, Path]:
    """Dense HF dir, dense checkpoint and the calibration prefix (reused if present)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"hf_dense": work / "hf_dense", "dense": work / "dense", "calib": work / "calib_train"}
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
    return paths


def draw_tokens(paths: dict[str, Path], out: Path, *, samples: int, seq_length: int,
                offset: int) -> Path:
    """The ``[samples, seq_length]`` windows ``prune_oneshot.py --calib-offset`` reads, as .npy
    (through the same :func:`calibration_windows`, so both sides see them by construction)."""
    import numpy as np

    from megatron.sparse.prune.data import calibration_windows

    out.mkdir(parents=True, exist_ok=True)
    tokens = out / f"calib_{samples}x{seq_length}_o{offset}.npy"
    windows = calibration_windows(str(paths["calib"]), tokenizer_spec=None, seq_length=seq_length,
                                  num_samples=samples, offset=offset)
    np.save(tokens, windows.numpy())
    return tokens


def run_ours(paths: dict[str, Path], work: Path, *, samples: int, seq_length: int, offset: int,
             micro_batch_size: int | None) -> dict:
    out = work / "ours_pruned"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "tools" / "prune_oneshot.py"),
           "--load", str(paths["dense"]), "--method", "sparsegpt", "--update-weight",
           "--calib-data", str(paths["calib"]), "--calib-samples", str(samples),
           "--seq-length", str(seq_length), "--calib-offset", str(offset), "--save", str(out)]
    if micro_batch_size:
        cmd += ["--micro-batch-size", str(micro_batch_size)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    row = timed_child(cmd, log=work / "ours.log", env=env)
    detail = row.pop("last_line")
    return {"side": "ours", **row, "detail": detail}


def run_peer(paths: dict[str, Path], work: Path, *, tokens: Path, peer_python: str,
             batch_size: int) -> dict:
    out = work / "peer_pruned"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [peer_python, str(PEER_SCRIPT), "--model", str(paths["hf_dense"]), "--tokens",
           str(tokens), "--out", str(out), "--batch-size", str(batch_size)]
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


def heldout_windows(paths: dict[str, Path], *, seq_length: int, max_windows: int | None):
    """The held-out embedded text in ``seq_length`` windows, tokenized like the dense model."""
    from megatron.sparse.data.tokenizer import load_tokenizer
    from megatron.sparse.eval.datasets import eval_windows

    return eval_windows("embedded", load_tokenizer(str(paths["hf_dense"])),
                        seq_length=seq_length, max_windows=max_windows)


def hf_ppl(path: Path, windows) -> tuple[float, "torch.nn.Module"]:
    """Perplexity of the HF model at ``path`` on ``windows`` (fp32), and the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.sparse.eval.hf_perplexity import hf_perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return round(hf_perplexity(model, windows).ppl, 4), model


def evaluate(work: Path, windows) -> dict:
    """Export ours, then one evaluator for ours and the peer; plus their mask agreement."""
    _tool("export_hf.py", "--load", str(work / "ours_pruned"), "--out", str(work / "ours_hf"),
          "--overwrite", log=work / "export.log")
    result, masks = {"eval_windows": list(windows.shape)}, {}
    for side, path in (("ours", work / "ours_hf"), ("llmcompressor", work / "peer_pruned")):
        result[f"ppl_{side}"], model = hf_ppl(path, windows)
        masks[side] = _projection_masks(model)
        del model
    same = sum(int((masks["ours"][k] == masks["llmcompressor"][k]).sum()) for k in masks["ours"])
    total = sum(m.numel() for m in masks["ours"].values())
    result["mask_agreement"] = round(same / total, 4)
    return result
