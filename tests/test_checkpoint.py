"""A checkpoint saved at TP=2 loads at TP=1 and TP=4 with identical logits and eval masks."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.sparse import checkpoint
from megatron.sparse.convert.sharding import merge_state_dicts
from megatron.sparse.layers import sparse_layers
from megatron.sparse.model import model_forward
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa


def _gathered(local: dict) -> dict:
    shards = [None] * parallel_state.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return merge_state_dicts(shards)


def _eval(model, tokens):
    model.eval()
    with torch.no_grad():
        logits = model_forward(model, tokens)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    masks = _gathered({f"{n}.mask_logits": l.eval_mask().clone() for n, l in sparse_layers(model)})
    return {"logits": torch.cat(parts, -1), "masks": masks}


def _save(root, tokens):
    torch.manual_seed(11)  # same on every rank: logits differ per rank only through sharding
    model = tiny_gqa().build()
    for _, layer in sparse_layers(model):
        torch.nn.init.normal_(layer.mask_logits, std=1.0)
    checkpoint.save_checkpoint(root, model, iteration=7, args=tiny_gqa(),
                               meta={"mask_source": "test"})
    return _eval(model, tokens)


def _load(root, tokens):
    model, args = checkpoint.load_model(root)
    assert args == tiny_gqa()
    return _eval(model, tokens)


def test_save_tp2_load_tp1_and_tp4(tmp_path):
    tokens = torch.randint(0, 256, (2, 10))
    saved = run_distributed(_save, 2, str(tmp_path), tokens)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert checkpoint.read_checkpoint_meta(tmp_path)["mask_source"] == "test"
    for tp in (1, 4):
        got = run_distributed(_load, tp, str(tmp_path), tokens)
        torch.testing.assert_close(got["logits"], saved["logits"], rtol=1e-5, atol=1e-5)
        assert got["masks"].keys() == saved["masks"].keys()
        for key in saved["masks"]:
            assert torch.equal(got["masks"][key], saved["masks"][key]), key


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a megatron-sparse checkpoint"):
        checkpoint.read_model_args(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoint.resolve_iteration(tmp_path)
