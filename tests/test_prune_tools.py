"""tools/prune_oneshot.py and tools/eval_ppl.py on a tiny checkpoint: outputs and user errors."""

import json

import pytest
import torch

from megatron.sparse import parallel
from megatron.sparse.checkpoint import read_checkpoint_meta, save_checkpoint
from tests import tools
from tests.tiny import tiny_gqa
from tests.tools import run_tool_in_process


def run_tool(name, *args):
    """The tool on one thread with library warnings silenced (stderr holds only its messages)."""
    return tools.run_tool(name, *args, timeout=300, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "dense"
    with parallel.distributed(1, seed=7):
        args = tiny_gqa()
        model = args.build()
        save_checkpoint(root, model, iteration=0, args=args,
                        meta={"mask_source": "none", "tokenizer": "toy-tokenizer",
                              "hf_config": {"model_type": "llama"}})
    return root


def test_magnitude_tool_saves_masks_and_keeps_meta(dense_ckpt, tmp_path):
    out = tmp_path / "magnitude"
    res = run_tool("prune_oneshot", "--load", dense_ckpt, "--method", "magnitude",
                   "--seq-length", 16, "--save", out)
    assert res.returncode == 0, res.stderr
    assert "layer 2/2" in res.stdout and "peak memory" in res.stdout
    meta = read_checkpoint_meta(out)
    assert meta["mask_source"] == "magnitude" and meta["weights_updated"] is False
    assert meta["format_version"] == 2 and meta["mask_storage"] == "fixed"
    assert meta["tokenizer"] == "toy-tokenizer" and meta["hf_config"] == {"model_type": "llama"}
    from megatron.sparse.checkpoint import load_model
    from megatron.sparse.layers import sparse_layers

    with parallel.distributed(1):
        dense, _ = load_model(dense_ckpt)
        pruned, _ = load_model(out)
        for (name, a), (_, b) in zip(sparse_layers(dense), sparse_layers(pruned)):
            assert torch.equal(a.weight, b.weight), name
            m = b.eval_mask()
            assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
            groups = a.weight.abs().reshape(m.shape[0], -1, 4)
            kept = groups.masked_fill(~m.reshape(groups.shape), float("inf")).amin(-1)
            dropped = groups.masked_fill(m.reshape(groups.shape), -1.0).amax(-1)
            assert bool((kept >= dropped).all()), name


def test_tool_user_errors(dense_ckpt, tmp_path):
    cases = [
        (["--method", "obs", "--seq-length", 8], "invalid choice: 'obs'"),
        (["--method", "wanda", "--update-weight", "--calib-data", "x", "--seq-length", 8],
         "error: --update-weight only applies to sparsegpt"),
        (["--method", "wanda", "--seq-length", 8], "error: --method wanda needs --calib-data"),
        (["--method", "magnitude", "--seq-length", 8, "--tp", 3],
         "error: tensor-parallel size 3 does not divide the attention heads"),
        (["--method", "wanda", "--calib-data", tmp_path / "nodata", "--seq-length", 8],
         "error: --calib-data .*nodata: no .*nodata.bin/.idx"),
    ]
    import re

    for i, (extra, message) in enumerate(cases):
        # The first case through the command line itself, the others in-process (same script).
        res = (run_tool if i == 0 else run_tool_in_process)(
            "prune_oneshot", "--load", dense_ckpt, "--save", tmp_path / "o", *extra)
        assert res.returncode == 2, (extra, res.stderr)
        assert re.search(message, res.stderr), (message, res.stderr)
        assert "Traceback" not in res.stderr
    res = run_tool_in_process("prune_oneshot", "--load", tmp_path / "none", "--method",
                              "magnitude", "--seq-length", 8, "--save", tmp_path / "o")
    assert res.returncode == 2 and "is not a megatron-sparse checkpoint" in res.stderr
    res = run_tool("eval_ppl", "--load", dense_ckpt, "--data", "x", "--seq-length", 8, "--tp", 3)
    assert res.returncode == 2 and "does not divide the attention heads" in res.stderr
    res = run_tool_in_process("eval_ppl", "--load", dense_ckpt, "--data", "x", "--seq-length",
                              4096)
    assert res.returncode == 2 and "exceeds the model's max_position_embeddings" in res.stderr
