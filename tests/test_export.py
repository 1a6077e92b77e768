"""Export to HF and import of packed mask files: round trips across TP, formats, bad files."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.sparse import checkpoint
from megatron.sparse.layers import sparse_layers
from megatron.sparse.mask import is_two_four
from tests.distributed import run_distributed
from tests.hf_tiny import tiny_hf_model
from tests.tools import run_tool, run_tool_in_process
from tests.train_fixtures import write_tokens

def _train(cfg):
    from megatron.sparse.train.loop import MaskTrainer

    MaskTrainer(cfg).run()


def _megatron_ppl(root, windows):
    from megatron.sparse.eval.perplexity import megatron_perplexity

    model, _ = checkpoint.load_model(root)
    return megatron_perplexity(model, windows).ppl


def _eval_masks(root):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.sparse.convert.sharding import merge_state_dicts

    model, _ = checkpoint.load_model(root)
    local = {f"{n}.weight": l.eval_mask().clone() for n, l in sparse_layers(model)}
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return merge_state_dicts(shards)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A tiny MHA model converted from HF, with masks learned for 3 steps at TP=2."""
    from megatron.sparse.train.config import TrainConfig

    root = tmp_path_factory.mktemp("export")
    hf = tiny_hf_model("llama2_mha")
    hf.save_pretrained(root / "hf")
    assert run_tool("convert_hf_to_megatron", "--hf", root / "hf", "--tp", 2, "--out",
                    root / "dense").returncode == 0
    write_tokens(str(root / "tokens"), docs=30, doc_len=40, vocab=128)
    cfg = TrainConfig(load=str(root / "dense"), data=str(root / "tokens"),
                      save=str(root / "learned"), seq_length=16, micro_batch_size=2,
                      global_batch_size=4, train_iters=3, lr=0.05, logits_lr_mult=1.0,
                      tau_start=1.0, tau_end=0.5, kappa_start=5, kappa_end=10)
    run_distributed(_train, 2, cfg)
    return root, hf


@pytest.fixture(scope="module")
def exported(learned):
    """The learned checkpoint exported once: (HF dir, mask file)."""
    root, _ = learned
    result = run_tool("export_hf", "--load", root / "learned", "--out", root / "hf_sparse",
                      "--mask-file", root / "masks.npz")
    assert result.returncode == 0, result.stderr
    return root / "hf_sparse", root / "masks.npz"


def test_export_round_trip_ppl_and_formats(learned, exported):
    from transformers import AutoModelForCausalLM

    from megatron.sparse.eval.hf_perplexity import apply_mask_file, hf_perplexity

    root, hf = learned
    hf_dir, mask_file = exported
    windows = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))
    megatron_ppl = run_distributed(_megatron_ppl, 2, str(root / "learned"), windows)
    dense = tiny_hf_model("llama2_mha")
    apply_mask_file(dense, mask_file)
    masked_file_ppl = hf_perplexity(dense, windows).ppl
    sparse_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    exported_ppl = hf_perplexity(sparse_model, windows).ppl
    assert abs(masked_file_ppl / megatron_ppl - 1) < 1e-3
    assert abs(exported_ppl / megatron_ppl - 1) < 1e-3
    # the exported weights are exactly the dense weights times 2:4 masks
    masks = np.load(mask_file, allow_pickle=False)
    state = sparse_model.state_dict()
    for key in masks.files:
        weight = state[key.removesuffix(".mask")]
        bits = np.unpackbits(masks[key])[:weight.numel()].reshape(weight.shape).astype(bool)
        assert is_two_four(torch.from_numpy(bits))
        original = hf.state_dict()[key.removesuffix(".mask")]
        assert torch.equal(weight, original * torch.from_numpy(bits))
    # packed: 1 bit per weight before compression
    total_bits = sum(masks[k].size for k in masks.files) * 8
    total_weights = sum(hf.state_dict()[k.removesuffix(".mask")].numel() for k in masks.files)
    assert total_weights <= total_bits < total_weights + 8 * len(masks.files)


def _eval_masks_of(roots):
    return [_eval_masks(root) for root in roots]


@pytest.mark.slow  # three multi-rank imports (~90 s); the bad-mask-file import test stays fast
def test_import_at_tp1_2_4_gives_identical_masks(learned, exported, tmp_path):
    root, _ = learned
    _, mask_file = exported
    reference = run_distributed(_eval_masks, 2, str(root / "learned"))
    outs = [tmp_path / f"fixed_tp{tp}" for tp in (1, 2, 4)]
    for tp, out in zip((1, 2, 4), outs):
        args = ("import_masks", "--load", root / "dense", "--mask-file", mask_file,
                "--save", out, "--as-fixed")
        result = run_tool_in_process(*args) if tp == 1 else run_tool(*args, nproc=tp)
        assert result.returncode == 0, result.stderr
    # as a prior: the same fixed masks, marked with the strength the trainer starts from
    result = run_tool_in_process("import_masks", "--load", root / "dense", "--mask-file",
                                 mask_file, "--save", tmp_path / "prior", "--as-prior",
                                 "--prior-strength", "10")
    assert result.returncode == 0, result.stderr
    meta = checkpoint.read_checkpoint_meta(tmp_path / "prior")
    assert meta["mask_source"].startswith("imported-prior") and meta["mask_role"] == "prior"
    assert meta["prior_strength"] == 10.0 and meta["mask_storage"] == "fixed"
    assert "logits_are_init" not in meta
    results = run_distributed(_eval_masks_of, 1, [str(p) for p in outs + [tmp_path / "prior"]])
    for name, got in zip(["fixed TP=1", "fixed TP=2", "fixed TP=4", "prior"], results):
        assert got.keys() == reference.keys(), name
        for key in reference:
            assert torch.equal(got[key], reference[key]), (name, key)


def _corrupt(path: Path, case: str, good: Path) -> None:
    data = dict(np.load(good, allow_pickle=False))
    key = "model.layers.0.self_attn.q_proj.weight.mask"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return
    if case == "missing":
        del data[key]
    elif case == "extra":
        data["model.layers.9.mlp.up_proj.weight.mask"] = data[key]
    elif case == "shape":
        data[key] = data[key][:-4]
    elif case == "not24":
        data[key] = np.full_like(data[key], 0xFF)
    elif case == "pickle":
        data[key] = np.array([{"evil": 1}], dtype=object)
    np.savez(path, **data) if case == "pickle" else np.savez_compressed(path, **data)


@pytest.mark.parametrize("case,message", [
    ("truncated", "masks.npz"),
    ("missing", "model.layers.0.self_attn.q_proj.weight.mask"),
    ("extra", "model.layers.9.mlp.up_proj.weight.mask"),
    ("shape", "model.layers.0.self_attn.q_proj.weight.mask"),
    ("not24", "model.layers.0.self_attn.q_proj.weight.mask"),
    ("pickle", "model.layers.0.self_attn.q_proj.weight.mask"),
])
def test_bad_mask_files_one_line_error_nothing_written(learned, exported, tmp_path, case,
                                                       message):
    root, _ = learned
    good = exported[1]
    bad = tmp_path / "masks.npz"
    _corrupt(bad, case, good)
    # The command line itself for one case; the others run the same script in-process.
    runner = run_tool if case == "truncated" else run_tool_in_process
    result = runner("import_masks", "--load", root / "dense", "--mask-file", bad, "--save",
                    tmp_path / "out", "--as-fixed")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_refuses_checkpoint_without_masks(learned, tmp_path):
    root, _ = learned
    result = run_tool_in_process("export_hf", "--load", root / "dense", "--out", tmp_path / "x")
    assert result.returncode == 2 and "holds no masks" in result.stderr
    assert not (tmp_path / "x").exists()
