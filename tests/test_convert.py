"""HF <-> Megatron conversion against transformers, round trips, and bad inputs."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron.sparse import checkpoint
from megatron.sparse.convert.hf_to_megatron import hf_to_megatron
from megatron.sparse.convert.megatron_to_hf import megatron_to_hf
from megatron.sparse.model import LlamaArgs, model_forward
from tests.distributed import run_distributed
from tests.hf_tiny import FAMILIES, tiny_hf_model
from tests.tools import run_tool, run_tool_in_process


def _save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _megatron_logits(root: str, tokens: torch.Tensor):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.sparse.layers import set_mask_state

    model, _ = checkpoint.load_model(root)
    set_mask_state(model, enabled=False)  # converted masks are untrained: dense
    model.eval()
    with torch.no_grad():
        logits = model_forward(model, tokens)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, -1)


def _convert_here(hf_dir, out, tp=1) -> subprocess.CompletedProcess:
    """The same tool in this process (the command line itself is run by ``embedded_dense``)."""
    return run_tool_in_process("convert_hf_to_megatron", "--hf", hf_dir, "--tp", tp, "--out", out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_at_tp1_and_tp2(family, tmp_path):
    hf = tiny_hf_model(family)
    hf_dir = _save_hf(hf, tmp_path / "hf")
    result = _convert_here(hf_dir, tmp_path / "meg", 2)
    assert result.returncode == 0, result.stderr
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
    for tp in (1, 2):
        got = run_distributed(_megatron_logits, tp, str(tmp_path / "meg"), tokens)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{family} TP={tp}: max abs diff {diff}"


def test_llama3_rope_scaling_changes_the_model():
    """The scaled config really differs from unscaled: the test above would catch a no-op."""
    scaled = tiny_hf_model("llama31_rope_scaling")
    args = LlamaArgs.from_hf_config(scaled.config.to_dict())
    assert args.rope_scaling and args.rope_scaling["factor"] == 8.0
    tokens = torch.randint(0, 128, (1, 40))
    from transformers import LlamaForCausalLM

    plain_cfg = scaled.config.to_dict()
    plain_cfg.pop("rope_scaling", None)
    plain_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    plain = LlamaForCausalLM(type(scaled.config)(**plain_cfg)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        assert (plain(tokens).logits - scaled(tokens).logits).abs().max() > 1e-3


def test_pure_functions_round_trip_bitwise():
    hf = tiny_hf_model("llama3_gqa")
    args = LlamaArgs.from_hf_config(hf.config.to_dict())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    back = megatron_to_hf(hf_to_megatron(state, args), args)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_hf_megatron_tp2_hf_round_trip(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model("tied_gqa")
    hf_dir = _save_hf(hf, tmp_path / "hf")
    assert _convert_here(hf_dir, tmp_path / "meg", 2).returncode == 0
    result = run_tool("convert_megatron_to_hf", "--load", tmp_path / "meg", "--out",
                      tmp_path / "back")
    assert result.returncode == 0, result.stderr
    original, back = load_file(hf_dir / "model.safetensors"), load_file(
        tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def _bad_input_case(tmp_path: Path, case: str):
    hf = tiny_hf_model("llama3_gqa")
    hf_dir = _save_hf(hf, tmp_path / "hf")
    out, tp = tmp_path / "out", 1
    if case == "architecture":
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
        (hf_dir / "config.json").write_text(json.dumps(cfg))
    elif case == "tp_heads":
        tp = 3
    elif case == "tp_kv":
        tp = 4
    elif case in ("missing", "shape"):
        from safetensors.torch import load_file, save_file

        state = load_file(hf_dir / "model.safetensors")
        if case == "missing":
            del state["model.layers.1.mlp.up_proj.weight"]
        else:
            state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
        save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    elif case == "exists":
        out.mkdir()
        (out / "latest_checkpointed_iteration.txt").write_text("0")
    elif case == "pickle":
        (hf_dir / "model.safetensors").unlink()
        from tests.hf_tiny import PicklePayload  # outside torch's weights_only allowlist

        torch.save({"model.embed_tokens.weight": PicklePayload()}, hf_dir / "pytorch_model.bin")
    return hf_dir, out, tp


@pytest.mark.parametrize("case,message", [
    ("architecture", "unsupported architecture MistralForCausalLM"),
    ("tp_heads", "does not divide the attention heads"),
    ("tp_kv", "does not divide the KV heads"),
    ("missing", "missing weight model.layers.1.mlp.up_proj.weight"),
    ("shape", "model.layers.0.self_attn.k_proj.weight has shape (8, 64)"),
    ("exists", "already exists"),
    ("pickle", "pickle"),
])
def test_bad_inputs_one_line_error_and_nothing_written(tmp_path, case, message):
    hf_dir, out, tp = _bad_input_case(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    if case == "architecture":  # the command line itself; the other cases run in-process
        result = run_tool("convert_hf_to_megatron", "--hf", hf_dir, "--tp", tp, "--out", out)
    else:
        result = run_tool_in_process("convert_hf_to_megatron", "--hf", hf_dir, "--tp", tp,
                                     "--out", out)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before  # no output, no temporary leftovers
    if case == "exists":
        assert (out / "latest_checkpointed_iteration.txt").read_text() == "0"


@pytest.mark.slow
def test_embedded_model_matches_transformers_on_real_text(embedded_dense):
    """The tool's TP=3 conversion of the embedded model (the session's ``embedded_dense``)."""
    from megatron.sparse.data.tokenizer import encode, load_tokenizer
    from megatron.sparse.embedded import load_embedded_model

    text = "The Academy Awards are the oldest awards ceremony for achievements in motion pictures."
    tokens = torch.tensor([encode(load_tokenizer("embedded"), text)])
    with torch.no_grad():
        expected = load_embedded_model()(tokens).logits
    for tp in (1, 3):  # 9 heads / 3 KV heads: TP 1 or 3
        got = run_distributed(_megatron_logits, tp, str(embedded_dense), tokens)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-3, f"TP={tp}: max abs diff {diff}"
