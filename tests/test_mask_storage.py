"""Compact mask storage (checkpoint format 2): sizes, TP round trips, eval/export, priors, format 1."""

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.sparse import checkpoint, parallel
from megatron.sparse.layers import sparse_layers
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa
from tests.train_fixtures import write_tokens

# The 6 ways of keeping 2 of 4 (the documented candidate order), written out independently.
CANDIDATES = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1],
                           [0, 0, 1, 1]], dtype=torch.bool)


def _mask_of(choice: torch.Tensor) -> torch.Tensor:
    return CANDIDATES[choice.long()].reshape(choice.shape[0], -1)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _tensor_meta(root) -> dict:
    from megatron.core.dist_checkpointing import load_tensors_metadata

    return load_tensors_metadata(str(checkpoint.resolve_iteration(root)))


def _strip_format(root) -> None:
    """Rewrite model_args.json as format 1 wrote it (no format_version / mask_storage)."""
    path = Path(root) / checkpoint.ARGS_FILE
    meta = json.loads(path.read_text())
    meta.pop("format_version")
    meta.pop("mask_storage")
    path.write_text(json.dumps(meta))


# -- sizes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 1.4M-parameter HF LLaMA converted (dense) and magnitude-pruned (fixed) at TP=1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron.sparse.convert.pipeline import convert_hf_to_megatron
    from megatron.sparse.prune.calibration import prune_model

    root = tmp_path_factory.mktemp("storage")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256, max_position_embeddings=64))
    hf.save_pretrained(root / "hf")
    with parallel.distributed(1):
        convert_hf_to_megatron(str(root / "hf"), root / "dense", tp=1, log=lambda m: None)
        model, args = checkpoint.load_model(root / "dense", mask_kind="fixed", with_masks=False)
        prune_model(model, torch.empty(0, 0), method="magnitude")
        meta = checkpoint.read_checkpoint_meta(root / "dense")
        checkpoint.save_checkpoint(root / "pruned", model, iteration=0, args=args,
                                   meta={**meta, "mask_source": "magnitude"})
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.state_dict().values())
    return root, weight_bytes


def test_converted_holds_no_masks_pruned_holds_uint8_choices(converted):
    root, weight_bytes = converted
    dense, pruned = _tensor_meta(root / "dense"), _tensor_meta(root / "pruned")
    assert not [k for k in dense if "mask" in k]
    assert not [k for k in pruned if "mask_logits" in k]
    choices = {k: v for k, v in pruned.items() if k.endswith(".mask_choice")}
    assert len(choices) == 4  # one (layer-stacked) entry per sparse linear
    assert all(v.dtype == torch.uint8 for v in choices.values())
    for meta, storage in ((checkpoint.read_checkpoint_meta(root / "dense"), "dense"),
                          (checkpoint.read_checkpoint_meta(root / "pruned"), "fixed")):
        assert meta["format_version"] == 2 and meta["mask_storage"] == storage
    # on disk: converted ~ the weights; pruned adds 1 byte per 4 sparse weights
    sparse_numel = sum(math.prod(v.global_shape) for k, v in _tensor_meta(root / "dense").items()
                       if k.endswith(".weight") and any(s in k for s in
                                                        ("linear_qkv", "linear_proj", "fc1", "fc2")))
    dense_size = _du(checkpoint.resolve_iteration(root / "dense"))
    pruned_size = _du(checkpoint.resolve_iteration(root / "pruned"))
    assert 1.0 <= dense_size / weight_bytes < 1.05, (dense_size, weight_bytes)
    extra = pruned_size - dense_size
    assert 0.9 * sparse_numel / 4 <= extra < 1.1 * sparse_numel / 4 + 16384, (extra, sparse_numel)


# -- fixed masks across TP ------------------------------------------------------------------------
def _random_fixed_state(seed: int) -> dict:
    """A TP=1 state dict of the tiny model with random fixed choices (built on one rank)."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_gqa().build(mask_kind="fixed")
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for key in state:
        if key.endswith(".mask_choice"):
            state[key] = torch.randint(0, 6, state[key].shape, generator=gen, dtype=torch.uint8)
        elif key.endswith(".weight"):
            state[key] = torch.randn(state[key].shape, generator=gen)
    return state


def _save_fixed(root, state):
    from megatron.core import parallel_state

    from megatron.sparse.convert.sharding import shard_state_dict

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = tiny_gqa().build(mask_kind="fixed")
    model.load_state_dict(shard_state_dict(state, tp)[rank])
    checkpoint.save_checkpoint(root, model, iteration=0, args=tiny_gqa(),
                               meta={"mask_source": "test"})


def _load_fixed(root):
    model, _ = checkpoint.load_model(root)
    return {"kinds": sorted({layer.mask_kind for _, layer in sparse_layers(model)}),
            "choices": {f"{n}.mask_choice": layer.mask_choice.clone()
                        for n, layer in sparse_layers(model)},
            "masks": {n: layer.eval_mask().clone() for n, layer in sparse_layers(model)},
            "state": {k: v for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor)}}


@pytest.fixture(scope="module")
def fixed_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed") / "ckpt"
    state = run_distributed(_random_fixed_state, 1, 5)
    run_distributed(_save_fixed, 2, str(root), state)
    return root, state


def test_fixed_masks_saved_at_tp2_load_at_tp1_unsharded(fixed_tp2):
    root, state = fixed_tp2
    got = run_distributed(_load_fixed, 1, str(root))
    assert got["kinds"] == ["fixed"]
    assert got["choices"].keys() == {k for k in state if k.endswith(".mask_choice")}
    for key, choice in got["choices"].items():
        assert torch.equal(choice, state[key]), key
        name = key.removesuffix(".mask_choice")
        assert torch.equal(got["masks"][name], _mask_of(state[key])), name
    for key, value in state.items():
        assert torch.equal(got["state"][key], value), key


def test_eval_and_export_of_fixed_checkpoint_apply_exactly_the_mask(fixed_tp2, tmp_path):
    from safetensors.torch import load_file

    from megatron.sparse.convert.megatron_to_hf import megatron_to_hf
    from megatron.sparse.export.hf import export_hf
    from megatron.sparse.export.maskfile import unpack_mask
    from megatron.sparse.model import model_forward

    root, state = fixed_tp2
    args = tiny_gqa()
    masked = {k: v for k, v in state.items() if not k.endswith(".mask_choice")}
    for key, choice in state.items():
        if key.endswith(".mask_choice"):
            weight = key.removesuffix(".mask_choice") + ".weight"
            masked[weight] = state[weight] * _mask_of(choice)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with parallel.distributed(1):
        model, _ = checkpoint.load_model(root)
        reference = args.build(sparse=False)  # megatron's plain linears, pre-masked weights
        result = reference.load_state_dict(masked, strict=False)
        assert not result.unexpected_keys
        assert all(k.endswith("_extra_state") for k in result.missing_keys)
        model.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(model_forward(model, tokens), model_forward(reference, tokens),
                                       rtol=1e-5, atol=1e-5)
        out, mask_file = export_hf(str(root), tmp_path / "hf", log=lambda m: None)
    exported = load_file(str(out / "model.safetensors"))
    expected = megatron_to_hf(masked, args)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    with np.load(mask_file, allow_pickle=False) as packed:
        for key in packed.files:
            weight = expected[key.removesuffix(".mask")]
            bits = torch.from_numpy(unpack_mask(packed[key], tuple(weight.shape)))
            assert torch.equal(weight, exported[key.removesuffix(".mask")] * bits)
            assert bool(((weight != 0) <= bits).all())


# -- priors: the trainer's initial logits -------------------------------------------------------
def _reference_prior_logits(full_choices: dict, seed: int, strength: float) -> dict:
    """What the trainer (and the old --as-prior import) started from, as a plain formula:
    N(0, 0.01) drawn per unsharded layer, + strength * std * (overlap with the prior - 1)."""
    overlap_table = CANDIDATES.float() @ CANDIDATES.float().t()  # [prior candidate, candidate]
    out = {}
    for key, choice in full_choices.items():
        name = key.removesuffix(".mask_choice")
        logits_key = f"{name}.mask_logits"
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(logits_key.encode()))
        init = torch.randn(*choice.shape, 6, generator=gen) * 0.01
        out[logits_key] = init + strength * init.std() * (overlap_table[choice.long()] - 1.0)
    return out


def _initial_logits(cfg):
    from megatron.sparse.train.loop import MaskTrainer

    trainer = MaskTrainer(cfg)
    return {f"{n}.mask_logits": layer.mask_logits.detach().clone()
            for n, layer in sparse_layers(trainer.model)}


def test_training_from_fixed_prior_starts_from_the_old_logits(fixed_tp2, tmp_path):
    from megatron.sparse.train.config import TrainConfig

    root, state = fixed_tp2
    choices = {k: v for k, v in state.items() if k.endswith(".mask_choice")}
    write_tokens(str(tmp_path / "tokens"), docs=10, doc_len=40, vocab=256)
    cfg = TrainConfig(load=str(root), data=str(tmp_path / "tokens"), seq_length=16,
                      micro_batch_size=2, global_batch_size=2, train_iters=1, seed=11,
                      prior_strength=2.5)
    got = run_distributed(_initial_logits, 1, cfg)
    expected = _reference_prior_logits(choices, seed=11, strength=2.5)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    # an imported prior (mask_role "prior") brings its own strength and init seed
    meta_path = Path(root) / checkpoint.ARGS_FILE
    prior_root = tmp_path / "prior"
    import shutil

    shutil.copytree(root, prior_root)
    meta = json.loads(meta_path.read_text())
    meta.update(mask_role="prior", prior_strength=7.0, prior_seed=3)
    (prior_root / checkpoint.ARGS_FILE).write_text(json.dumps(meta))
    got = run_distributed(_initial_logits, 1, TrainConfig(**{**cfg.to_dict(),
                                                             "load": str(prior_root)}))
    expected = _reference_prior_logits(choices, seed=3, strength=7.0)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


# -- format 1 ---------------------------------------------------------------------------------------
def _save_format1(root, logits_scale: float, mask_source: str):
    torch.manual_seed(3)
    model = tiny_gqa().build(mask_kind="logits")
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.mask_logits.mul_(logits_scale)
    checkpoint.save_checkpoint(root, model, iteration=0, args=tiny_gqa(),
                               meta={"mask_source": mask_source})
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _load_all_ways(root):
    fixed, _ = checkpoint.load_model(root)
    logits_model = tiny_gqa().build(mask_kind="logits")
    checkpoint.load_into(root, logits_model, masks=False)
    checkpoint.load_masks(root, logits_model)
    return {"kind": sorted({l.mask_kind for _, l in sparse_layers(fixed)}),
            "fixed": {k: v.clone() for k, v in fixed.state_dict().items()
                      if isinstance(v, torch.Tensor)},
            "logits": {k: v.clone() for k, v in logits_model.state_dict().items()
                       if k.endswith(".mask_logits")}}


@pytest.mark.parametrize("mask_source,kind", [("none", "dense"), ("maskllm", "fixed")])
def test_format1_checkpoints_load(tmp_path, mask_source, kind):
    root = tmp_path / "old"
    saved = run_distributed(_save_format1, 2, str(root), 0.0 if kind == "dense" else 1.0,
                            mask_source)  # rank 0's shard of the saved state
    _strip_format(root)
    assert checkpoint.stored_mask_kind(checkpoint.read_checkpoint_meta(root)) == "logits"
    got = run_distributed(_load_all_ways, 1, str(root))
    assert got["kind"] == [kind]
    assert not [k for k in got["fixed"] if k.endswith(".mask_logits")]
    assert len(got["logits"]) == 8  # training/resume reads the logits themselves
    full_logits = got["logits"]
    for key, logits in full_logits.items():
        name = key.removesuffix(".mask_logits")
        if kind == "fixed":
            assert torch.equal(got["fixed"][f"{name}.mask_choice"],
                               logits.argmax(-1).to(torch.uint8)), name
        else:
            assert not logits.any(), name
    local_qkv = "decoder.layers.0.self_attention.linear_qkv.mask_logits"
    assert torch.equal(full_logits[local_qkv][:saved[local_qkv].shape[0]], saved[local_qkv])


def test_newer_format_is_a_one_line_error(tmp_path):
    (tmp_path / checkpoint.ARGS_FILE).write_text(json.dumps(
        {"model": tiny_gqa().to_dict(), "format_version": 99, "mask_storage": "fixed"}))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        checkpoint.load_model(tmp_path)
