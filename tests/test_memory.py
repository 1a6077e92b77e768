"""Memory estimator: meta-device counts vs transformers and the LLaMA formula, activation bytes
vs a hand count and vs the tensors autograd really saves, checkpoint size vs a saved one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.sparse.memory import MemoryConfig, activations as act, preset
from megatron.sparse.memory.meta import shard_counts
from megatron.sparse.model import LlamaArgs
from tests.hf_tiny import FAMILIES
from tests.tiny import tiny_gqa


def _hf_config(family: str):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       vocab_size=128, max_position_embeddings=128, **FAMILIES[family])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_count_equals_transformers(family):
    from transformers import LlamaForCausalLM

    config = _hf_config(family)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    expected = sum(p.numel() for p in hf.parameters())  # a tied embedding counted once
    args = LlamaArgs.from_hf_config(config.to_dict())
    assert shard_counts(args, 1).weights == expected


def test_llama2_7b_count_is_the_known_6_74b():
    h, layers, ffn, vocab = 4096, 32, 11008, 32000
    formula = 2 * vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h
    assert formula == 6_738_415_616
    counts = shard_counts(preset("llama2-7b"), 1)
    assert counts.weights == formula
    assert counts.sparse_weights == layers * (4 * h * h + 3 * h * ffn)
    assert counts.mask_logits == counts.sparse_weights // 4 * 6


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_divide_the_counts(tp):
    args = tiny_gqa()
    whole, shard = shard_counts(args, 1), shard_counts(args, tp)
    norms = args.num_layers * 2 * args.hidden_size + args.hidden_size  # replicated on each rank
    assert shard.weights == (whole.weights - norms) // tp + norms
    assert shard.sparse_weights * tp == whole.sparse_weights
    assert shard.mask_logits * tp == whole.mask_logits


def test_tp_not_dividing_the_heads_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^tensor-parallel size 3 does not divide the attention"):
        MemoryConfig(model="llama2-7b", tp=3).estimate()


@pytest.mark.parametrize("d", [4, 2])
def test_saved_activations_match_a_hand_count(d):
    """tiny_gqa: h 64, 8 heads of 8, 4 KV heads, FFN 128; s 16, b 2, TP 2, local attention."""
    s, b, t = 16, 2, 2
    shapes = {  # tensor kept for backward -> local elements
        "attention RMSNorm input": s * b * 64, "QKV input": s * b * 64,
        "Q after RoPE": s * b * 8 * 8 // t, "K repeated to 8 heads": s * b * 8 * 8 // t,
        "V repeated to 8 heads": s * b * 8 * 8 // t, "projection input": s * b * 64 // t,
        "MLP RMSNorm input": s * b * 64, "fc1 input": s * b * 64,
        "gate": s * b * 128 // t, "up": s * b * 128 // t, "silu(gate)": s * b * 128 // t,
        "fc2 input": s * b * 128 // t,
    }
    probs = b * 8 // t * s * s * (4 + (d if d < 4 else 0))  # fp32 softmax (+ a cast copy)
    expected = sum(shapes.values()) * d + probs
    shape = act.Shape(seq=s, batch=b, tp=t, act_bytes=d, flash=False)
    assert act.saved_per_layer(tiny_gqa(), shape) == expected


def _saved_bytes(dtype: torch.dtype, seq: int, batch: int) -> int:
    """Bytes autograd saves in one mask-learning forward (storages that are not parameters)."""
    from megatron.sparse import parallel
    from megatron.sparse.layers import sparse_layers
    from megatron.sparse.model import model_forward

    parallel.initialize(1)
    try:
        torch.manual_seed(0)
        model = tiny_gqa().build(params_dtype=dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in sparse_layers(model):
            layer.mask_logits.requires_grad_(True)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        tokens = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model_forward(model, tokens, tokens)
        return sum(saved.values())
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_what_autograd_saves(dtype):
    """The formula leaves out O(s*b + s*head_dim) tensors (RoPE tables, attention mask, RMSNorm
    statistics): a few per cent at this size, hence the 6 % tolerance."""
    seq, batch = 32, 2
    measured = _saved_bytes(dtype, seq, batch)
    cfg = MemoryConfig(model=tiny_gqa(), tool="train_mask", seq_length=seq, micro_batch=batch,
                       dtype="fp32" if dtype == torch.float32 else "bf16", cpu=True,
                       regulariser=False)
    estimate = cfg.estimate().activations
    assert measured == pytest.approx(estimate, rel=0.06)


def _checkpoint_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("iter_*/*") if f.is_file())


def test_checkpoint_size_of_a_converted_tiny_model(tmp_path):
    from megatron.core import dist_checkpointing

    from megatron.sparse import checkpoint, parallel

    args = tiny_gqa(hidden_size=256, intermediate_size=512, vocab_size=2048, num_layers=2)
    estimates = {legacy: MemoryConfig(model=args, tool="convert", dtype="fp32",
                                      legacy_format=legacy).estimate().checkpoint
                 for legacy in (False, True)}
    parallel.initialize(1)
    try:
        model = args.build()
        checkpoint.save_checkpoint(tmp_path, model, iteration=0, args=args,
                                   meta={"mask_source": "none"})
        keys = dist_checkpointing.load_tensors_metadata(str(tmp_path / "iter_0000000")).keys()
    finally:
        parallel.shutdown()
    legacy = any(k.endswith("mask_logits") for k in keys)  # main before the storage change
    # torch_dist adds metadata (a few kB here) to the tensor bytes
    assert _checkpoint_bytes(tmp_path) == pytest.approx(estimates[legacy], rel=0.03)
