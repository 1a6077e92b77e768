"""Structural pruning, learning side: estimator, budget, final masks, masking hooks, TP, errors."""

import pytest
import torch

from megatron.sparse import parallel
from megatron.sparse.model import model_forward
from megatron.sparse.structured.budget import project_to_budget, select_chunks
from megatron.sparse.structured.estimator import MovingBaseline, policy_gradient, sample_mask
from megatron.sparse.structured.masking import UnitMasker
from megatron.sparse.structured.policy import Budget, KeepProbs, parse_units
from megatron.sparse.structured.units import UnitMasks, full_parameters
from tests.distributed import run_distributed
from tests.tiny import tiny_gqa


# -- estimator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["moving", "batch"])
@pytest.mark.parametrize("estimator", ["normalized", "score"])
@pytest.mark.parametrize("seed", [0, 1])
def test_estimator_finds_the_optimal_mask_of_a_toy_objective(estimator, seed, baseline):
    """L(m) = sum_i w_i (1 - m_i) + noise; keeping half the units, the optimum keeps the
    large-w half. Policy gradient + projection from uniform s must end at exactly that mask
    (seeds 0-9 all did, for both estimators and both baselines, at these lr; units at s = 0 or 1
    are absorbing, so a larger lr can lock in a wrong unit early). The batch baseline's expected
    step is half the moving one's at K = 2 (leave-one-out), hence a larger lr."""
    gen = torch.Generator().manual_seed(seed)
    n, keep = 16, 0.5
    w = torch.cat([torch.linspace(0.1, 0.3, n // 2), torch.linspace(1.0, 1.5, n // 2)])
    w = w[torch.randperm(n, generator=gen)]
    s = torch.full((n,), keep)
    baseline_kind, baseline = baseline, MovingBaseline(0.2)
    steps, k = 300, 2
    for step in range(steps):
        masks = torch.stack([sample_mask(s, seed=seed, step=step, sample=j, pool=0)
                             for j in range(k)])
        losses = (w * (~masks).float()).sum(1) + 0.1 * torch.randn(k, generator=gen)
        delta = baseline.update(float(losses.mean()))
        if baseline_kind == "batch":
            delta = float(losses.mean())
        lr = (0.01 if baseline_kind == "moving" else 0.015) * (0.5 + 0.5 * torch.cos(torch.tensor(torch.pi * step / steps)))
        s = project_to_budget(s - lr * policy_gradient(losses, masks, s, delta,
                                                       estimator=estimator), keep * n)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.topk(s, int(keep * n)).indices] = True
    optimal = torch.zeros(n, dtype=torch.bool)
    optimal[torch.topk(w, int(keep * n)).indices] = True
    assert torch.equal(chosen, optimal), (s, w)


def test_samples_are_bernoulli_and_counter_based():
    probs = torch.linspace(0, 1, 101).repeat(200, 1)
    m = sample_mask(probs, seed=3, step=7, sample=1, pool=0)
    # 200 draws per column: binomial std <= 0.5 / sqrt(200) = 0.035; 5 std = 0.18
    assert (m.float().mean(0) - probs[0]).abs().max() < 0.18
    assert torch.equal(m, sample_mask(probs, seed=3, step=7, sample=1, pool=0))
    assert not torch.equal(m, sample_mask(probs, seed=3, step=7, sample=2, pool=0))


# -- budget --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_projection_meets_budget_and_never_raises(seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(3000, generator=gen) * 1.4 - 0.2
    target = 0.6 * 3000 * float(torch.rand((), generator=gen))
    out = project_to_budget(s, target)
    assert abs(float(out.sum()) - target) < 1e-3
    assert bool((out <= s.clamp(0, 1) + 1e-7).all()) and float(out.min()) >= 0
    under = torch.rand(100, generator=gen) * 0.5
    assert torch.equal(project_to_budget(under, 80.0), under)  # already under budget: unchanged


@pytest.mark.parametrize("units", [("channels", "heads"), ("channels",),
                                   ("channels", "heads", "blocks")])
@pytest.mark.parametrize("keep", [0.55, 0.8, 0.9])
def test_final_masks_meet_the_parameter_budget(units, keep):
    args = tiny_gqa(num_layers=4)
    gen = torch.Generator().manual_seed(int(keep * 100))
    budget = Budget(keep_ratio=keep, units=units, channel_multiple=8, block_keep=0.9)
    probs = KeepProbs(kv_groups=torch.rand(4, 4, generator=gen),
                      channels=torch.rand(4, 128, generator=gen),
                      blocks=torch.rand(4, 2, generator=gen))
    masks = probs.final_masks(args, budget).canonical()
    target = keep * full_parameters(args)
    kept = masks.kept_parameters(args)
    # channels fill what is left, in chunks of 8 channels of 3 * hidden weights each
    assert 0 <= target - kept < 8 * 3 * args.hidden_size
    widths = masks.channels_per_layer()
    assert bool((widths % 8 == 0).all()) and bool((widths[masks.mlp] >= 8).all())
    assert bool((masks.kv_groups_per_layer()[masks.attention] >= 1).all())


def test_chunked_top_k_is_global_top_k_per_layer_prefix():
    gen = torch.Generator().manual_seed(5)
    probs = torch.rand(3, 10, generator=gen)
    keep = select_chunks(probs, torch.ones(3, dtype=torch.bool), count=12, multiple=1)
    ref = torch.zeros(30, dtype=torch.bool)
    ref[torch.topk(probs.flatten(), 12).indices] = True  # independent: plain global top-k
    if bool(ref.reshape(3, 10).any(1).all()):  # the keep-one-per-layer rule does not bind
        assert torch.equal(keep, ref.reshape(3, 10))
    assert int(keep.sum()) == 12


# -- masking hooks -------------------------------------------------------------------------------
def _random_masks(args, seed):
    gen = torch.Generator().manual_seed(seed)
    n = args.num_layers
    return UnitMasks(kv_groups=torch.rand(n, args.num_key_value_heads, generator=gen) < 0.6,
                     channels=torch.rand(n, args.intermediate_size, generator=gen) < 0.6,
                     attention=torch.tensor([True, False]), mlp=torch.tensor([False, True]))


def test_masked_model_equals_zeroed_weights():
    """Independent reference: removing a unit = zeroing its columns of linear_proj / fc2."""
    args = tiny_gqa()
    with parallel.distributed(1, seed=4):
        model = args.build(sparse=False)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args.vocab_size, (2, 12), generator=gen)
        masks = _random_masks(args, 0)
        masker = UnitMasker(model, args)
        masker.set(masks)
        with torch.no_grad():
            masked = model_forward(model, tokens)
        masker.remove()
        width = args.num_attention_heads // args.num_key_value_heads * args.kv_channels
        c = masks.canonical()
        with torch.no_grad():
            for i, layer in enumerate(model.decoder.layers):
                cols = c.kv_groups[i].repeat_interleave(width)
                layer.self_attention.linear_proj.weight[:, ~cols] = 0
                layer.mlp.linear_fc2.weight[:, ~c.channels[i]] = 0
            zeroed = model_forward(model, tokens)
    assert torch.allclose(masked, zeroed, atol=1e-6)  # same sums, fp32 reassociation only


def _tp_losses(full_state, tokens):
    from megatron.core import parallel_state

    from megatron.sparse.convert.sharding import shard_state_dict
    from megatron.sparse.structured.init import wanda_sp_probs

    args = tiny_gqa()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = args.build(sparse=False)
    rank = parallel_state.get_tensor_model_parallel_rank()
    model.load_state_dict(shard_state_dict(full_state, tp)[rank])
    budget = Budget(keep_ratio=0.7, units=("channels", "heads", "blocks"), channel_multiple=8)
    probs = wanda_sp_probs(model, args, tokens, budget, micro_batch_size=2)
    masker = UnitMasker(model, args)
    losses, sampled = [], []
    for j in range(3):
        m = probs.sample(seed=9, step=0, sample=j, units=budget.units)
        masker.set(m)
        with torch.no_grad():
            losses.append(model_forward(model, tokens[:, :-1], tokens[:, 1:]).mean())
        sampled.append(torch.cat([m.kv_groups.flatten(), m.channels.flatten(), m.attention, m.mlp]))
    return {"losses": torch.stack(losses), "masks": torch.stack(sampled),
            "probs": torch.cat([t.flatten() for t in probs.tensors().values()])}


@pytest.mark.slow
def test_tp2_gives_the_masks_losses_and_init_of_tp1():
    args = tiny_gqa()
    with parallel.distributed(1, seed=11):
        full_state = args.build(sparse=False).state_dict()
    full_state = {k: v for k, v in full_state.items() if v is not None and "_extra_state" not in k}
    tokens = torch.randint(0, args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    with parallel.distributed(1, seed=11):  # the unsharded reference, in this process
        one = _tp_losses(full_state, tokens)
    two = run_distributed(_tp_losses, 2, full_state, tokens)
    assert torch.equal(one["masks"], two["masks"])
    # fp32 sums split over 2 ranks: differences at 1e-6 relative, far inside 1e-4
    assert torch.allclose(one["losses"], two["losses"], rtol=1e-4)
    assert torch.allclose(one["probs"], two["probs"], atol=1e-4)


class _FixedBatches:
    """``micro_batches(step)`` of the learner: one fixed ``[b, s + 1]`` batch per step."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def micro_batches(self, step: int):
        batch = self.tokens[step % self.tokens.shape[0]]
        yield batch[:, :-1], batch[:, 1:]


def _learned(full_state, tokens, steps):
    from megatron.sparse.structured.config import StructConfig
    from megatron.sparse.structured.trainer import StructuredLearner

    args = tiny_gqa()
    model = args.build(sparse=False)
    model.load_state_dict(full_state)
    budget = Budget(keep_ratio=0.7, units=("channels", "heads", "blocks"), channel_multiple=8)
    cfg = StructConfig(load="-", calib_data="-", keep_ratio=0.7, units="channels,heads,blocks",
                       steps=steps, samples_per_step=4, batch_size=2, micro_batch_size=2,
                       seq_length=tokens.shape[-1] - 1, log_interval=steps, lr=0.05)
    learner = StructuredLearner(model=model, args=args, cfg=cfg, budget=budget,
                                probs=KeepProbs.uniform(args, budget), data=_FixedBatches(tokens))
    probs = learner.run()
    return {"probs": torch.cat([t.flatten() for t in probs.tensors().values()]),
            "baseline": torch.tensor(float("nan") if learner.baseline.value is None
                                     else learner.baseline.value, dtype=torch.float64)}


@pytest.mark.slow
def test_dp2_learns_the_probabilities_of_dp1():
    """DP splits the K samples of a step over the ranks (sample k on rank k % dp) and sums the
    losses: every sample's loss is computed whole on one rank, so DP=2 must end bitwise where
    DP=1 does (both run one thread per rank)."""
    args = tiny_gqa()
    with parallel.distributed(1, seed=12):
        full_state = args.build(sparse=False).state_dict()
    full_state = {k: v for k, v in full_state.items() if v is not None and "_extra_state" not in k}
    tokens = torch.randint(0, args.vocab_size, (3, 2, 17),
                           generator=torch.Generator().manual_seed(4))
    one = run_distributed(_learned, 1, full_state, tokens, 4, tp=1)
    two = run_distributed(_learned, 2, full_state, tokens, 4, tp=1)
    uniform = run_distributed(_learned, 1, full_state, tokens, 0, tp=1)
    assert not torch.equal(one["probs"], uniform["probs"])  # the 4 steps moved the probabilities
    assert torch.equal(one["probs"], two["probs"])
    assert torch.equal(one["baseline"], two["baseline"])


# -- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5])
def test_keep_ratio_outside_range_is_an_error(keep):
    with pytest.raises(ValueError, match="keep-ratio"):
        Budget(keep_ratio=keep, units=("channels",))


def test_unknown_unit_is_an_error():
    with pytest.raises(ValueError, match="unknown unit"):
        parse_units("channels,layers")


def test_budget_that_would_empty_a_layer_is_an_error():
    """Without blocks every layer keeps >= one chunk; a budget below that is refused."""
    probs = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="fewer than one chunk"):
        select_chunks(probs, torch.ones(4, dtype=torch.bool), count=20, multiple=8)


def test_masks_and_state_of_another_model_are_errors(tmp_path):
    args, other = tiny_gqa(), tiny_gqa(intermediate_size=64)
    UnitMasks.full(other).save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="another model"):
        UnitMasks.load(tmp_path / "m.npz", args)
    state = KeepProbs.uniform(other, Budget(keep_ratio=0.8, units=("channels",))).state_dict()
    with pytest.raises(ValueError, match="another model"):
        KeepProbs.from_state_dict(state, args)


def test_unit_masks_round_trip(tmp_path):
    args = tiny_gqa()
    masks = _random_masks(args, 3)
    masks.save(tmp_path / "m.npz")
    back = UnitMasks.load(tmp_path / "m.npz", args)
    assert all(torch.equal(getattr(masks, f), getattr(back, f))
               for f in ("kv_groups", "channels", "attention", "mlp"))


# -- the tool ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    from tests.train_fixtures import tiny_checkpoint, write_tokens

    root = tmp_path_factory.mktemp("structured")
    write_tokens(str(root / "tokens"), docs=40, doc_len=64, vocab=256)
    return tiny_checkpoint(str(root / "dense")), str(root / "tokens")


@pytest.mark.slow
def test_tool_learns_resumes_and_writes_the_sliced_checkpoint(tiny_run_inputs, tmp_path):
    import json

    from megatron.sparse.checkpoint import read_checkpoint_meta
    from megatron.sparse.structured.trainer import STATE_FILE
    from tests.tools import run_tool_in_process

    dense, tokens = tiny_run_inputs
    out = tmp_path / "out"
    common = ["--load", dense, "--calib-data", tokens, "--keep-ratio", 0.7, "--units",
              "channels,heads", "--seq-length", 16, "--batch-size", 2, "--calib-samples", 4,
              "--calib-seq-length", 16, "--channel-multiple", 8, "--save", out]
    res = run_tool_in_process("prune_structured", *common, "--steps", 2)
    assert res.returncode == 0, res.stderr
    assert "step 2/2" in res.stdout and "ETA" in res.stdout
    res = run_tool_in_process("prune_structured", *common, "--steps", 3)
    assert res.returncode == 0, res.stderr
    assert "resumed at step 2" in res.stdout and "step 3/3" in res.stdout
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 3
    info = json.loads((out / "structured.json").read_text())
    args = tiny_gqa()
    masks = UnitMasks.load(out / "unit_masks.npz", args)
    assert info["kept_parameters"] == masks.kept_parameters(args)
    assert 0 <= 0.7 * full_parameters(args) - info["kept_parameters"] < 8 * 3 * args.hidden_size
    structure = read_checkpoint_meta(out)["structure"]
    assert structure["channels_per_layer"] == info["channels_per_layer"]


@pytest.mark.parametrize("flags, message", [
    (["--keep-ratio", 1.5], "--keep-ratio must be in (0, 1]"),
    (["--units", "channels,rows"], "unknown unit"),
    (["--init", "magic"], "unknown --init"),
])
def test_tool_bad_inputs_are_one_line_errors(tmp_path, flags, message):
    from tests.tools import run_tool_in_process

    args = {"--load": tmp_path / "dense", "--calib-data": tmp_path / "tokens", "--keep-ratio": 0.7,
            "--save": tmp_path / "o", "--steps": 0}
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag] = value
    res = run_tool_in_process("prune_structured", *[x for kv in args.items() for x in kv])
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_tool_refuses_a_checkpoint_of_another_model_to_resume(tmp_path):
    from megatron.sparse.checkpoint import write_model_args
    from tests.tools import run_tool_in_process

    dense, tokens = tmp_path / "dense", tmp_path / "tokens"
    write_model_args(dense, tiny_gqa())  # the model description is all this check reads
    out = tmp_path / "o"
    state = KeepProbs.uniform(tiny_gqa(intermediate_size=64),
                              Budget(keep_ratio=0.7, units=("channels", "heads")))
    out.mkdir()
    torch.save({"probs": state.state_dict(), "baseline": None, "step": 1, "keep_ratio": 0.7,
                "units": "channels,heads"}, out / "structured_state.pt")
    res = run_tool_in_process("prune_structured", "--load", dense, "--calib-data", tokens,
                              "--keep-ratio", 0.7, "--save", out, "--steps", 2)
    assert res.returncode == 2 and "another model" in res.stderr
