"""SLoRB: init and forward against the plain formula, TP=1/2/4 parity, checkpoints, HF export.

The reference is ``y = x (M * W)^T + x X^T S^T`` with the group-sum projection ``X [d/k, d]``
written out as a dense matrix, computed on the unsharded weight.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron.sparse import checkpoint, parallel
from megatron.sparse.layers import sparse_layers
from megatron.sparse.model import model_forward
from megatron.sparse.prune.apply import store_mask
from megatron.sparse.prune.magnitude import magnitude_mask
from megatron.sparse.slorb import attach_slorb, slorb_branches, slorb_parameters
from tests.distributed import run_distributed
from tests.test_checkpoint import _gathered  # TP shards merged like a TP=1 state dict
from tests.tiny import tiny_gqa

K = 16
META = {"mask_source": "magnitude"}
# fp32 sums of <= 128 products of O(1) terms: rounding ~ 128 * 6e-8 relative; 1e-5 leaves room
# for the different summation orders of the layers and the reference.
ATOL = 1e-5


def _masked_model(seed: int):
    """A tiny magnitude-pruned model (TP=1)."""
    torch.manual_seed(seed)
    model = tiny_gqa().build(mask_kind="fixed")
    for _, layer in sparse_layers(model):
        store_mask(layer, magnitude_mask(weight=layer.weight.detach()))
    return model


def _pruned_model(seed: int, *, train_projection: bool, perturb: bool = True):
    """:func:`_masked_model` with SLoRB, S (and X) perturbed by the seed's generator."""
    model = _masked_model(seed)
    params = attach_slorb(model, k=K, train_projection=train_projection)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _dense_projection(d: int, k: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``X [d/k, d]`` with ``X[i, j] = groups[i, j - i k]`` on the diagonal blocks (ones default)."""
    proj = torch.zeros(d // k, d)
    for i in range(d // k):
        proj[i, i * k:(i + 1) * k] = 1.0 if groups is None else groups[i]
    return proj


def test_init_equals_the_formula_on_the_unsharded_weight():
    with parallel.distributed(1):
        model = _pruned_model(0, train_projection=False, perturb=False)
        for name, layer in sparse_layers(model):
            w, m = layer.weight.detach(), layer.eval_mask()
            n, d = w.shape
            pruned_sum = (w * ~m) @ _dense_projection(d, K).T  # each k-group's pruned sum
            torch.testing.assert_close(layer.slorb.S, pruned_sum / K, rtol=0, atol=ATOL)
            assert layer.slorb.X is None and tuple(layer.slorb.S.shape) == (n, d // K), name


@pytest.mark.parametrize("train_projection", [False, True])
def test_layer_forward_equals_the_formula(train_projection):
    gen = torch.Generator().manual_seed(3)
    with parallel.distributed(1):
        model = _pruned_model(3, train_projection=train_projection)
        model.eval()
        for name, layer in sparse_layers(model):
            w, m, branch = layer.weight.detach(), layer.eval_mask(), layer.slorb
            x = torch.randn(5, 2, w.shape[1], generator=gen)
            groups = None if branch.X is None else branch.X.detach()
            proj = _dense_projection(w.shape[1], K, groups)
            expected = F.linear(x, w * m) + x @ proj.T @ branch.S.detach().T
            with torch.no_grad():
                torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=ATOL)
            # the branch matters: without it the output differs by far more than the tolerance
            assert (F.linear(x, w * m) - expected).abs().max() > 100 * ATOL, name


def _run(model, tokens):
    """Full logits and the unsharded gradients of every SLoRB tensor, at the current TP."""
    model.eval()
    for p in slorb_parameters(model):
        p.grad = None
    logits = model_forward(model, tokens)
    model_forward(model, tokens, labels=torch.roll(tokens, -1, 1)).sum().backward()
    grads = {f"{name}.slorb.{t}": getattr(b, t).grad.clone()
             for name, b in slorb_branches(model) for t in ("S", "X") if getattr(b, t) is not None}
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.detach().contiguous(), group=group)
    return {"logits": torch.cat(parts, -1), "grads": _gathered(grads)}


def _load_run_save(root, tokens, save_root):
    model, args = checkpoint.load_model(root)
    out = _run(model, tokens)
    if save_root:
        checkpoint.save_checkpoint(save_root, model, iteration=1, args=args,
                                   meta=checkpoint.read_checkpoint_meta(root))
    return out


def _reference(root, tokens, train_projection):
    with parallel.distributed(1):
        model = _pruned_model(5, train_projection=train_projection)
        checkpoint.save_checkpoint(root, model, iteration=0, args=tiny_gqa(), meta=META)
        return _run(model, tokens)


def _assert_same(got, want):
    # logits: the same sums split over ranks (reduce order differs): a few fp32 ulps of O(1) values
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=ATOL)
    assert got["grads"].keys() == want["grads"].keys()
    for key in want["grads"]:  # summed over 2 x 10 tokens of O(1) gradients
        torch.testing.assert_close(got["grads"][key], want["grads"][key], rtol=1e-4, atol=1e-4,
                                   msg=key)


def test_tp2_equals_unsharded_and_checkpoints_reshard(tmp_path, train_projection=True):
    """Saved at TP=1, run at TP=2 (logits, S/X gradients), saved at TP=2, loaded back at TP=1."""
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(7))
    want = _reference(str(tmp_path / "tp1"), tokens, train_projection)
    got = run_distributed(_load_run_save, 2, str(tmp_path / "tp1"), tokens, str(tmp_path / "tp2"))
    _assert_same(got, want)
    meta = checkpoint.read_checkpoint_meta(tmp_path / "tp2")
    assert meta["slorb"] == {"k": K, "train_projection": train_projection}
    with parallel.distributed(1):
        back = _load_run_save(str(tmp_path / "tp2"), tokens, None)
    _assert_same(back, want)


@pytest.mark.slow
def test_tp4_equals_unsharded(tmp_path):
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(8))
    want = _reference(str(tmp_path / "tp1"), tokens, False)  # TP=2 covers the trained X
    _assert_same(run_distributed(_load_run_save, 4, str(tmp_path / "tp1"), tokens, None), want)


def test_k_not_dividing_the_input_is_a_one_line_error():
    with parallel.distributed(1):
        model = _masked_model(0)
        before = {k for k, v in model.state_dict().items() if torch.is_tensor(v)}
        with pytest.raises(ValueError, match=r"SLoRB k=48 does not divide the input dimension "
                                             r"per TP rank of .* \(64\); pick a k") as err:
            attach_slorb(model, k=48, train_projection=False)
        assert "\n" not in str(err.value)
        assert all(layer.slorb is None for _, layer in sparse_layers(model))  # nothing attached
        assert {k for k, v in model.state_dict().items() if torch.is_tensor(v)} == before


def test_attach_to_a_dense_model_is_an_error():
    with parallel.distributed(1):
        torch.manual_seed(0)
        model = tiny_gqa().build(mask_kind="dense")
        with pytest.raises(ValueError, match="has no mask"):
            attach_slorb(model, k=K, train_projection=False)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def test_hf_export_reproduces_megatron_logits_and_perplexity(tmp_path):
    """export_hf and convert_megatron_to_hf of a SLoRB checkpoint load in transformers with the
    Megatron logits; the HF-side PPL is the Megatron-side one (the tools' functions)."""
    from transformers import AutoModelForCausalLM

    from megatron.sparse.convert.pipeline import convert_megatron_to_hf
    from megatron.sparse.eval.hf_perplexity import hf_perplexity, load_hf_model
    from megatron.sparse.eval.perplexity import megatron_perplexity
    from megatron.sparse.export.hf import export_hf

    gen = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, 256, (2, 12), generator=gen)
    windows = torch.randint(0, 256, (3, 17), generator=gen)
    root = str(tmp_path / "ckpt")
    with parallel.distributed(1):
        checkpoint.save_checkpoint(root, _pruned_model(12, train_projection=True), iteration=0,
                                   args=tiny_gqa(), meta=META)
        export_hf(root, tmp_path / "hf", log=lambda *_: None)
        convert_megatron_to_hf(root, tmp_path / "hf_dense", log=lambda *_: None)
        results = {}
        for name, kind in (("hf", "fixed"), ("hf_dense", "dense")):
            model, _ = checkpoint.load_model(root, mask_kind=kind)
            model.eval()
            with torch.no_grad():
                results[name] = (model_forward(model, tokens),
                                 megatron_perplexity(model, windows).ppl)
    for name, (logits, ppl) in results.items():
        hf = load_hf_model(str(tmp_path / name))
        assert type(hf).__name__ == "SLoRBLlamaForCausalLM"
        # fp32, same weights, different kernels (attention, RoPE): the converter's 1e-4 bound
        torch.testing.assert_close(_hf_logits(hf, tokens), logits, rtol=0, atol=1e-4)
        assert abs(hf_perplexity(hf, windows).ppl / ppl - 1) < 1e-3
        if name == "hf":  # the inference path keeps the branch next to the compressed weight
            from megatron.sparse.inference.sparsify import SLoRBSparseLinear24, sparsify

            assert len(sparsify(hf)) == 7 * tiny_gqa().num_layers
            assert isinstance(hf.model.layers[0].mlp.down_proj, SLoRBSparseLinear24)
            torch.testing.assert_close(_hf_logits(hf, tokens), logits, rtol=0, atol=1e-4)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(ValueError):  # no silent plain-LLaMA load that drops the branches
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False)


def test_other_remote_code_needs_trust_remote_code(tmp_path):
    import shutil

    from megatron.sparse.eval.hf_perplexity import load_hf_model
    from megatron.sparse.export.slorb_hf import MODELING_FILE, hf_export_parts

    config, files = hf_export_parts({"slorb": {"k": K, "train_projection": False}},
                                    {"model_type": "llama"})
    assert config["auto_map"]["AutoModelForCausalLM"].startswith(MODELING_FILE[:-3] + ".")
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    (tmp_path / MODELING_FILE).write_text(files[MODELING_FILE] + "\nimport os  # changed\n")
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        load_hf_model(str(tmp_path))
    shutil.rmtree(tmp_path)
