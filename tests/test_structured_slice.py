"""Physical slicing of structural units against a masked ``transformers`` model.

The reference is a ``transformers`` LlamaForCausalLM with the unit masks applied by forward hooks
(zeroed inputs of ``o_proj`` / ``down_proj``, zeroed outputs of removed blocks); it shares no code
with the slicer. Tolerance: the sliced and the masked models compute the same sums (removed terms
are exact zeros), so they differ only by fp32 reassociation between megatron's and HF's kernels:
a few ulps of O(1) activations per layer, ~1e-6 on logits of O(1) here; 1e-5 bounds that.
"""

from pathlib import Path

import pytest
import torch

from megatron.sparse import checkpoint, parallel
from megatron.sparse.convert.pipeline import convert_hf_to_megatron, convert_megatron_to_hf
from megatron.sparse.model import LlamaArgs, model_forward
from megatron.sparse.structured.hetero import layer_shapes, valid_tp_sizes
from megatron.sparse.structured.slice import slice_checkpoint
from megatron.sparse.structured.units import UnitMasks
from tests.distributed import run_distributed
from tests.test_convert import _megatron_logits
from tests.tools import run_tool_in_process

TOL = 1e-5  # see the module docstring


def _hf_model(seed: int, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                  intermediate_size=96, num_hidden_layers=4, vocab_size=128,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**(fields | sizes))).eval()
    with torch.no_grad():  # norms away from 1, so a norm left in a removed block would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _masks(cfg, gen: torch.Generator, *, groups: list[int], channels: list[int],
           attention: list[bool], mlp: list[bool]) -> UnitMasks:
    """Random masks keeping ``groups[i]`` KV groups and ``channels[i]`` channels of layer i."""
    layers, kv, ffn = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.intermediate_size
    kv_groups = torch.zeros(layers, kv, dtype=torch.bool)
    chans = torch.zeros(layers, ffn, dtype=torch.bool)
    for i in range(layers):
        kv_groups[i, torch.randperm(kv, generator=gen)[:groups[i]]] = True
        chans[i, torch.randperm(ffn, generator=gen)[:channels[i]]] = True
    return UnitMasks(kv_groups=kv_groups, channels=chans, attention=torch.tensor(attention),
                     mlp=torch.tensor(mlp))


@torch.no_grad()
def _masked_hf_logits(hf, masks: UnitMasks, tokens: torch.Tensor) -> torch.Tensor:
    """The reference: ``hf`` with the masks applied by hooks (removed = zero contribution)."""
    cfg = hf.config
    per = cfg.num_attention_heads // cfg.num_key_value_heads
    handles = []

    def scale_input(mask):
        return lambda module, args: (args[0] * mask.to(args[0].dtype),)

    def zero_output(module, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else \
            torch.zeros_like(out)

    for i, layer in enumerate(hf.model.layers):
        attn = bool(masks.attention[i]) and bool(masks.kv_groups[i].any())
        mlp = bool(masks.mlp[i]) and bool(masks.channels[i].any())
        if attn:
            heads = masks.kv_groups[i].repeat_interleave(per * cfg.head_dim)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(scale_input(heads)))
        else:
            handles.append(layer.self_attn.register_forward_hook(zero_output))
        if mlp:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                scale_input(masks.channels[i])))
        else:
            handles.append(layer.mlp.register_forward_hook(zero_output))
    try:
        return hf(tokens).logits
    finally:
        for h in handles:
            h.remove()


def _convert_and_slice(hf, masks: UnitMasks, root: Path) -> Path:
    hf.save_pretrained(root / "hf")
    with parallel.distributed(1):
        convert_hf_to_megatron(str(root / "hf"), root / "dense", tp=1, log=lambda *a: None)
        slice_checkpoint(root / "dense", masks, root / "sliced")
    return root / "sliced"


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _logits_here(root, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a checkpoint at TP 1 in this process (its masks, if any, applied)."""
    with parallel.distributed(1), torch.no_grad():
        model, _ = checkpoint.load_model(root)
        return model_forward(model.eval(), tokens)


def test_sliced_matches_masked_transformers_at_tp1(tmp_path):
    """Channels (a width 2:4 cannot group: dense linears), 3 of 4 KV groups, a removed attention
    block, a removed MLP, and an attention block whose every group is pruned."""
    gen = torch.Generator().manual_seed(0)
    hf = _hf_model(0)
    masks = _masks(hf.config, gen, groups=[3, 4, 0, 2], channels=[37, 96, 50, 0],
                   attention=[True, False, True, True], mlp=[True, True, False, True])
    sliced = _convert_and_slice(hf, masks, tmp_path)
    args = checkpoint.read_model_args(sliced)
    assert [(s.num_query_groups, s.ffn_hidden_size) for s in layer_shapes(args)] == \
        [(3, 37), (0, 96), (0, 0), (2, 0)]
    tokens = torch.randint(0, 128, (2, 24), generator=gen)
    expected = _masked_hf_logits(hf, masks, tokens)
    assert _diff(_logits_here(sliced, tokens), expected) <= TOL
    # the masks matter: the unmasked model is far away
    with torch.no_grad():
        assert _diff(hf(tokens).logits, expected) > 1e-2
    meta = checkpoint.read_checkpoint_meta(sliced)
    dense_args = checkpoint.read_model_args(tmp_path / "dense")
    assert meta["structure"]["kept_parameters"] == masks.kept_parameters(dense_args)


@pytest.fixture(scope="module")
def tp2_model(tmp_path_factory):
    """A tiny model sliced with masks valid at TP 2 (even KV groups, channels multiple of 8)."""
    root = tmp_path_factory.mktemp("slice_tp2")
    gen = torch.Generator().manual_seed(1)
    hf = _hf_model(1)
    masks = _masks(hf.config, gen, groups=[2, 4, 2, 2], channels=[48, 96, 0, 40],
                   attention=[False, True, True, True], mlp=[True, True, False, True])
    return hf, masks, _convert_and_slice(hf, masks, root), gen


@pytest.mark.slow
def test_sliced_matches_masked_transformers_at_tp2(tp2_model):
    hf, masks, sliced, gen = tp2_model
    args = checkpoint.read_model_args(sliced)
    assert 2 in valid_tp_sizes(args) and 4 not in valid_tp_sizes(args)
    tokens = torch.randint(0, 128, (2, 24), generator=gen)
    expected = _masked_hf_logits(hf, masks, tokens)
    assert _diff(run_distributed(_megatron_logits, 2, str(sliced), tokens), expected) <= TOL


def test_hf_export_of_sliced_model_matches(tp2_model, tmp_path):
    """The export loads in plain ``transformers`` with remote code and gives the same logits."""
    from transformers import AutoModelForCausalLM

    hf, masks, sliced, gen = tp2_model
    with parallel.distributed(1):
        convert_megatron_to_hf(sliced, tmp_path / "hf", log=lambda *a: None)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "modeling_sliced_llama.py" in files and "configuration_sliced_llama.py" in files
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (2, 24), generator=gen)
    with torch.no_grad():
        got = exported(tokens).logits
    assert _diff(got, _masked_hf_logits(hf, masks, tokens)) <= TOL
    with parallel.distributed(1):  # and back: the sliced_llama directory converts to megatron
        convert_hf_to_megatron(str(tmp_path / "hf"), tmp_path / "back", tp=2, log=lambda *a: None)
    assert checkpoint.same_model(checkpoint.read_model_args(tmp_path / "back").to_dict(),
                                 checkpoint.read_model_args(sliced).to_dict())
    assert _diff(_logits_here(tmp_path / "back", tokens), got) <= TOL
    # cached greedy decoding (layer 0 has no attention: its cache entry must still grow)
    from megatron.sparse.inference.generate import greedy_generate

    prompt = tokens[:1, :8]
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, exported(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert greedy_generate(exported, prompt, 6).tokens == ids[0, 8:].tolist()
    # fewer parameters than the unsliced model, by exactly the removed units
    removed = sum(p.numel() for p in hf.parameters()) - sum(p.numel() for p in exported.parameters())
    args = LlamaArgs.from_hf_config(hf.config.to_dict())
    assert removed == UnitMasks.full(args).kept_parameters(args) - masks.kept_parameters(args)


def test_uniform_slice_is_plain_llama(tmp_path):
    gen = torch.Generator().manual_seed(2)
    hf = _hf_model(2)
    masks = _masks(hf.config, gen, groups=[2] * 4, channels=[64] * 4, attention=[True] * 4,
                   mlp=[True] * 4)
    sliced = _convert_and_slice(hf, masks, tmp_path)
    args = checkpoint.read_model_args(sliced)
    assert args.block_configs is None
    assert (args.num_key_value_heads, args.num_attention_heads, args.intermediate_size) == \
        (2, 4, 64)
    from transformers import AutoModelForCausalLM

    with parallel.distributed(1):
        convert_megatron_to_hf(sliced, tmp_path / "out", log=lambda *a: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 128, (1, 16), generator=gen)
    with torch.no_grad():
        assert _diff(exported(tokens).logits, _masked_hf_logits(hf, masks, tokens)) <= TOL


def test_magnitude_prune_and_export_on_sliced_model(tp2_model, tmp_path):
    """The 2:4 tools run on the smaller model: magnitude pruning, then export_hf."""
    hf, masks, sliced, gen = tp2_model
    pruned, out = tmp_path / "pruned", tmp_path / "hf24"
    result = run_tool_in_process("prune_oneshot", "--load", sliced, "--method", "magnitude",
                                 "--seq-length", 16, "--save", pruned)
    assert result.returncode == 0, result.stderr
    _check_2_4_export(pruned, out, gen)


def _check_2_4_export(ckpt, out, gen) -> None:
    """``export_hf`` of a 2:4 checkpoint loads in transformers, is 2:4, and has its logits."""
    from transformers import AutoModelForCausalLM

    from megatron.sparse.mask import is_two_four

    result = run_tool_in_process("export_hf", "--load", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    projections = [(n, p) for n, p in exported.named_parameters() if n.endswith("proj.weight")]
    assert projections
    for name, p in projections:
        assert is_two_four(p != 0), name
    tokens = torch.randint(0, 128, (2, 16), generator=gen)
    with torch.no_grad():
        got = exported(tokens).logits
    assert _diff(got, _logits_here(ckpt, tokens)) <= TOL


def test_mask_learning_and_export_on_sliced_model(tp2_model, tmp_path):
    """Mask learning runs on the smaller model (per-layer widths, removed blocks), and its
    result exports to a 2:4 Hugging Face model with the same logits."""
    from tests.train_fixtures import write_tokens

    hf, masks, sliced, gen = tp2_model
    data, trained, out = str(tmp_path / "tokens"), tmp_path / "trained", tmp_path / "hf"
    write_tokens(data, docs=8, doc_len=40, vocab=128, seed=5)
    result = run_tool_in_process("train_mask", "--load", sliced, "--data", data, "--save",
                                 trained, "--seq-length", 16, "--micro-batch-size", 2,
                                 "--global-batch-size", 2, "--train-iters", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_2_4_export(trained, out, gen)


def test_bad_inputs(tp2_model, tmp_path):
    hf, masks, sliced, gen = tp2_model
    dense = sliced.parent / "dense"
    args = checkpoint.read_model_args(sliced)
    with pytest.raises(ValueError, match=r"layer 2 .* TP 4.*valid TP sizes: 1, 2"):
        args.validate(4)
    other = UnitMasks.full(LlamaArgs.from_dict(checkpoint.read_model_args(dense).to_dict()
                                               | {"intermediate_size": 128}))
    with parallel.distributed(1):
        with pytest.raises(ValueError, match="another model"):
            slice_checkpoint(dense, other, tmp_path / "x")
        with pytest.raises(ValueError, match="already sliced"):
            slice_checkpoint(sliced, masks, tmp_path / "y")
        with pytest.raises(ValueError, match="new directory"):
            slice_checkpoint(dense, masks, dense)


EMBEDDED_SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      intermediate_size=1536, num_hidden_layers=3, vocab_size=384)


@pytest.mark.slow
def test_embedded_shape_kv_groups_at_tp1_and_blocks_channels_at_tp3(tmp_path):
    """The embedded model's shapes (9 heads, 3 KV groups): KV-group pruning can only be sharded
    at TP 1 (2 or 1 of 3 groups), so it is checked there; at TP 3 every layer keeps all 3 or no
    groups, and channels in multiples of 3 * 4 (2:4 per rank)."""
    gen = torch.Generator().manual_seed(3)
    hf = _hf_model(3, **EMBEDDED_SHAPE)
    tokens = torch.randint(0, 384, (1, 20), generator=gen)
    kv = _masks(hf.config, gen, groups=[2, 1, 3], channels=[1000, 1536, 7],
                attention=[True] * 3, mlp=[True] * 3)
    sliced = _convert_and_slice(hf, kv, tmp_path / "kv")
    assert valid_tp_sizes(checkpoint.read_model_args(sliced), two_four=False) == [1]
    assert _diff(_logits_here(sliced, tokens), _masked_hf_logits(hf, kv, tokens)) <= TOL
    blocks = _masks(hf.config, gen, groups=[3, 3, 3], channels=[1200, 612, 1536],
                    attention=[True, False, True], mlp=[True, True, False])
    sliced = _convert_and_slice(hf, blocks, tmp_path / "blocks")
    assert 3 in valid_tp_sizes(checkpoint.read_model_args(sliced))
    got = run_distributed(_megatron_logits, 3, str(sliced), tokens)
    assert _diff(got, _masked_hf_logits(hf, blocks, tokens)) <= TOL


@pytest.mark.slow
def test_sliced_model_prunes_at_tp2_like_tp1(tp2_model, tmp_path):
    """The sliced checkpoint loads, prunes and saves at TP 2 (torchrun), and that checkpoint
    loads at TP 1: magnitude 2:4 is TP-invariant, so both exports are identical."""
    from safetensors.torch import load_file

    from tests.tools import run_tool

    hf, masks, sliced, gen = tp2_model
    for tp in (1, 2):
        pruned = tmp_path / f"pruned{tp}"
        result = run_tool("prune_oneshot", "--load", sliced, "--method", "magnitude",
                          "--seq-length", 16, "--save", pruned, nproc=tp)
        assert result.returncode == 0, result.stderr
        result = run_tool_in_process("export_hf", "--load", pruned, "--out", tmp_path / f"hf{tp}")
        assert result.returncode == 0, result.stderr
    one, two = (load_file(str(tmp_path / f"hf{tp}" / "model.safetensors")) for tp in (1, 2))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
