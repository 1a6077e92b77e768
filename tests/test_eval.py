"""Perplexity (Megatron side vs transformers), shared windows, and the packed mask file."""

import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.sparse import parallel
from megatron.sparse.eval.datasets import cut_windows, eval_text, tokenize_text
from megatron.sparse.eval.hf_perplexity import apply_mask_file, hf_perplexity
from megatron.sparse.eval.perplexity import megatron_perplexity
from megatron.sparse.export.maskfile import (expected_mask_shapes, load_mask_file, pack_mask,
                                             save_mask_file)
from megatron.sparse.layers import set_mask_state, sparse_layers
from megatron.sparse.prune.calibration import prune_model
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa


# -- an independent Megatron -> HF mapping of the tiny model (not the product converter) ----------
def hf_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                       num_attention_heads=args.num_attention_heads,
                       num_key_value_heads=args.num_key_value_heads,
                       intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                       max_position_embeddings=args.max_position_embeddings,
                       rope_theta=args.rope_theta, rms_norm_eps=args.rms_norm_eps,
                       tie_word_embeddings=args.tie_word_embeddings, attention_bias=False,
                       mlp_bias=False)


def to_hf(state, args):
    """Megatron TP=1 tensors -> HF names: qkv is [q heads of g; k_g; v_g] per KV group g."""
    kv, heads, hd = args.num_key_value_heads, args.num_attention_heads, args.kv_channels
    per = heads // kv
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or key.endswith("_extra_state") or "mask_logits" in key \
                or "mask_choice" in key:
            continue
        if key == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif key == "output_layer.weight":
            out["lm_head.weight"] = t
        else:
            i, rest = key[len("decoder.layers."):].split(".", 1)
            p = f"model.layers.{i}."
            if rest == "input_layernorm.weight":
                out[p + "input_layernorm.weight"] = t
            elif rest == "pre_mlp_layernorm.weight":
                out[p + "post_attention_layernorm.weight"] = t
            elif rest == "self_attention.linear_qkv.weight":
                g = t.reshape(kv, (per + 2) * hd, -1)
                out[p + "self_attn.q_proj.weight"] = g[:, :per * hd].reshape(-1, t.shape[1])
                out[p + "self_attn.k_proj.weight"] = g[:, per * hd:(per + 1) * hd].reshape(
                    -1, t.shape[1])
                out[p + "self_attn.v_proj.weight"] = g[:, (per + 1) * hd:].reshape(-1, t.shape[1])
            elif rest == "self_attention.linear_proj.weight":
                out[p + "self_attn.o_proj.weight"] = t
            elif rest == "mlp.linear_fc1.weight":
                gate, up = t.chunk(2, 0)
                out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            elif rest == "mlp.linear_fc2.weight":
                out[p + "mlp.down_proj.weight"] = t
            else:
                raise KeyError(key)
    return out


def hf_model(state, args):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(args)).float().eval()
    missing, unexpected = model.load_state_dict(to_hf(state, args), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def tiny():
    args = tiny_gqa()
    with parallel.distributed(1, seed=11):
        model = args.build()
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
    stream = torch.randint(0, args.vocab_size, (5 * 32 + 7,),
                           generator=torch.Generator().manual_seed(4))
    return args, state, stream


def _megatron_ppl(state, windows, dense):
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    from megatron.sparse.convert.sharding import shard_state_dict

    fixed = any(k.endswith(".mask_choice") for k in state)  # a pruned state: fixed masks
    model = tiny_gqa().build(mask_kind="fixed" if fixed else "logits")
    model.load_state_dict(shard_state_dict(state, tp)[rank])
    if dense:
        set_mask_state(model, enabled=False)
    return megatron_perplexity(model, windows, micro_batch_size=2).to_dict()


def test_windows():
    stream = torch.arange(23)
    w = cut_windows(stream, seq_length=5)
    assert w.shape == (4, 5) and w[1].tolist() == [5, 6, 7, 8, 9]
    spread = cut_windows(stream, seq_length=5, max_windows=2)  # windows 0 and 2 of 4
    assert spread[:, 0].tolist() == [0, 10] and spread.shape == (2, 5)
    assert torch.equal(cut_windows(stream, seq_length=5, max_windows=9), w)
    with pytest.raises(ValueError, match="fewer than one window of 30"):
        cut_windows(stream, seq_length=30)


def test_text_file_and_tokenize(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("hello world\n\nsecond paragraph")
    assert eval_text(str(path)) == "hello world\n\nsecond paragraph"
    with pytest.raises(FileNotFoundError, match="not 'embedded', 'wikitext2'"):
        eval_text(str(tmp_path / "missing.txt"))

    class Toy:
        def encode(self, text):
            return [ord(c) for c in text]

    assert tokenize_text(Toy(), "ab").tolist() == [97, 98]


def test_dense_ppl_matches_transformers_and_hand_ce(tiny):
    args, state, stream = tiny
    windows = cut_windows(stream, seq_length=32)
    got = run_distributed(_megatron_ppl, 1, state, windows, True)
    assert got["tokens"] == 5 * 31 and got["seq_length"] == 32
    model = hf_model(state, args)
    with torch.no_grad():  # cross entropy by hand on transformers' logits
        logits = model(input_ids=windows[:, :-1]).logits.double()
        logp = logits.log_softmax(-1).gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1)
        hand = math.exp(float(-logp.mean()))
    assert abs(got["ppl"] - hand) / hand < 1e-4
    hf = hf_perplexity(model, windows, micro_batch_size=3)
    assert hf.tokens == got["tokens"]
    assert abs(hf.ppl - got["ppl"]) / got["ppl"] < 1e-3
    tp2 = run_distributed(_megatron_ppl, 2, state, windows, True)
    assert abs(tp2["ppl"] - got["ppl"]) / got["ppl"] < 1e-5


def _pruned_state(state, stream):
    model = tiny_gqa().build()
    model.load_state_dict(state)
    prune_model(model, cut_windows(stream, seq_length=32)[:3], method="wanda")
    out = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out.update({f"{n}.mask": l.eval_mask().clone() for n, l in sparse_layers(model)})
    return out


def test_masked_ppl_megatron_vs_hf_with_mask_file(tiny, tmp_path):
    args, state, stream = tiny
    windows = cut_windows(stream, seq_length=32)
    pruned = run_distributed(_pruned_state, 1, state, stream)
    masks = {k[:-len(".mask")] + ".weight": v for k, v in pruned.items() if k.endswith(".mask")}
    sparse_state = {k: v for k, v in pruned.items() if not k.endswith(".mask")}
    meg = run_distributed(_megatron_ppl, 1, sparse_state, windows, False)
    dense = run_distributed(_megatron_ppl, 1, state, windows, True)
    assert meg["ppl"] != dense["ppl"]
    # the HF model gets the dense (updated) weights and the masks from a packed mask file
    hf_masks = {k + ".mask": v for k, v in to_hf(masks, args).items()}
    assert len(hf_masks) == 7 * args.num_layers
    path = tmp_path / "masks.npz"
    save_mask_file(path, hf_masks)
    model = hf_model(sparse_state, args)
    unmasked = hf_perplexity(model, windows).ppl
    assert apply_mask_file(model, path) == 14
    hf = hf_perplexity(model, windows).ppl
    assert abs(hf - meg["ppl"]) / meg["ppl"] < 1e-5  # far inside the 0.1 % requirement
    assert abs(unmasked - meg["ppl"]) / meg["ppl"] > 2e-4  # the masks matter (random tiny model)


# -- packed mask file ----------------------------------------------------------------------------
SHAPES = {"model.layers.0.self_attn.q_proj.weight.mask": (6, 8),
          "model.layers.0.mlp.down_proj.weight.mask": (3, 12)}


def _masks():
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, (r, c) in SHAPES.items():
        idx = torch.rand(r, c // 4, 4, generator=g).argsort(-1)[..., :2]
        m = torch.zeros(r, c // 4, 4, dtype=torch.bool).scatter_(-1, idx, True)
        out[key] = m.reshape(r, c)
    return out


def test_mask_file_round_trip_and_format(tmp_path):
    masks = _masks()
    path = tmp_path / "m.npz"
    save_mask_file(path, masks)
    loaded = load_mask_file(path, SHAPES)
    assert loaded.keys() == masks.keys()
    for key in masks:
        assert loaded[key].dtype == torch.bool and torch.equal(loaded[key], masks[key])
    # format: uint8 packbits, MSB first, C order (checked against a hand-packed byte)
    raw = np.load(path, allow_pickle=False)
    q = masks["model.layers.0.self_attn.q_proj.weight.mask"].numpy().reshape(-1)
    byte0 = sum(int(b) << (7 - i) for i, b in enumerate(q[:8]))
    assert raw["model.layers.0.self_attn.q_proj.weight.mask"].dtype == np.uint8
    assert int(raw["model.layers.0.self_attn.q_proj.weight.mask"][0]) == byte0
    assert list(tmp_path.iterdir()) == [path]  # no temp files left


def test_expected_shapes_from_config():
    from transformers import LlamaConfig

    shapes = expected_mask_shapes(LlamaConfig(hidden_size=64, num_hidden_layers=1,
                                              num_attention_heads=8, num_key_value_heads=2,
                                              intermediate_size=96))
    assert shapes["model.layers.0.self_attn.k_proj.weight.mask"] == (16, 64)
    assert shapes["model.layers.0.mlp.down_proj.weight.mask"] == (64, 96)
    assert len(shapes) == 7


def _write(path, arrays):
    np.savez_compressed(path, **arrays)


def test_bad_mask_files(tmp_path):
    masks = {k: pack_mask(v) for k, v in _masks().items()}
    q, d = list(SHAPES)
    cases = {
        "missing": ({q: masks[q]}, f"lacks 1 expected key.*{d}"),
        "extra": ({**masks, "model.layers.9.mlp.up_proj.weight.mask": masks[q]},
                  "unexpected key.*layers.9.mlp.up_proj"),
        "size": ({q: masks[q][:-1], d: masks[d]}, f"{q}: 5 bytes do not hold a mask of shape"),
        "dtype": ({q: masks[q].astype(np.int32), d: masks[d]}, f"{q}: expected a 1-D uint8"),
        "not24": ({q: np.full_like(masks[q], 255), d: masks[d]}, f"{q} is not 2:4"),
        "pickle": ({q: np.array([{"evil": 1}], dtype=object), d: masks[d]},
                   f"{q} cannot be read without unpickling"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        _write(path, arrays)
        with pytest.raises(ValueError, match=message):
            load_mask_file(path, SHAPES)
    good = tmp_path / "good.npz"
    _write(good, masks)
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz|truncated or corrupted"):
        load_mask_file(tmp_path / "trunc.npz", SHAPES)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_mask_file(tmp_path / "junk.npz", SHAPES)
    with pytest.raises(FileNotFoundError):
        load_mask_file(tmp_path / "none.npz", SHAPES)
    with pytest.raises(ValueError, match="is not 2:4"):
        save_mask_file(tmp_path / "x.npz", {q: torch.ones(6, 8, dtype=torch.bool)})
