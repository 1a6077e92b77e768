"""Mask math: candidate order, 2:4 invariant, Gumbel sampling statistics, prior, regulariser."""

import itertools

import pytest
import torch

from megatron.sparse import mask as M


def test_candidate_order_is_fixed_and_complete():
    s = M.candidate_matrix()
    expected = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert s.tolist() == expected
    # the 6 rows are exactly the 2-subsets of 4 positions in lexicographic order
    combos = [[int(i in c) for i in range(4)] for c in itertools.combinations(range(4), 2)]
    assert s.tolist() == combos


def test_hard_mask_is_two_four_in_every_group():
    torch.manual_seed(0)
    logits = torch.randn(37, 24, 6)
    mask = M.groups_to_weight(M.hard_mask(logits))
    assert mask.shape == (37, 96) and mask.dtype == torch.bool
    assert (mask.reshape(37, 24, 4).sum(-1) == 2).all()
    # argmax candidate k keeps exactly candidate k's positions
    idx = logits.argmax(-1)
    assert torch.equal(M.hard_mask(logits), M.candidate_matrix(torch.bool)[idx])


def _draw_counters(draws: int) -> torch.Tensor:
    """Counters of ``draws`` groups of 6 logits (one layer of 1000 rows)."""
    return M.noise_index(torch.arange(1000), draws // 1000)


def test_gumbel_argmax_frequency_matches_softmax_probability():
    logits = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.4])
    tau, kappa, draws = 1.0, 2.0, 200_000
    noise = M.gumbel_noise(7, _draw_counters(draws)).reshape(draws, 6)
    winners = ((kappa * logits + noise) / tau).argmax(-1)
    freq = torch.bincount(winners, minlength=6).float() / draws
    expected = torch.softmax(kappa * logits / tau, -1)
    # binomial standard error at 2e5 draws is ~1e-3; 5 sigma
    torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)


def test_gumbel_noise_is_finite_and_has_gumbel_moments():
    g = M.gumbel_noise(3, _draw_counters(400_000)).flatten()
    assert torch.isfinite(g).all()
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 0.01
    assert abs(g.var().item() - torch.pi ** 2 / 6) < 0.02


def test_counter_uniform_is_uniform_and_decorrelated_across_seeds_and_neighbours():
    counters = _draw_counters(120_000).flatten()
    u = M.counter_uniform(11, counters)
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    hist = torch.histc(u, bins=20, min=0.0, max=1.0) / u.numel()
    torch.testing.assert_close(hist, torch.full((20,), 0.05), atol=2e-3, rtol=0)
    v = M.counter_uniform(12, counters)
    assert not torch.equal(u, v)
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()
    assert corr(u, v) < 0.01  # the next seed (step)
    assert corr(u[:-1], u[1:]) < 0.01  # neighbouring logits
    assert torch.equal(u, M.counter_uniform(11, counters))  # a pure function of (seed, index)


def test_counter_uniform_matches_a_plain_uint32_reference():
    def mix(x):  # lowbias32 on Python ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, idx = 987654321, [0, 1, 5, 2**31 + 3, 2**32 - 1]
    expected = [((mix((mix(i ^ seed) + seed) & 0xFFFFFFFF) >> 9) + 0.5) / 2**23 for i in idx]
    got = M.counter_uniform(seed, torch.tensor(idx))
    assert got.tolist() == pytest.approx(expected, abs=0, rel=1e-7)


def test_noise_index_of_shards_is_a_slice_of_the_unsharded_index():
    full = M.noise_index(torch.arange(8), 6)
    rows = M.noise_index(torch.arange(4, 8), 6)  # column-parallel rank 1 of 2
    cols = M.noise_index(torch.arange(8), 3, group_offset=3, total_groups=6)  # row-parallel
    assert torch.equal(rows, full[4:]) and torch.equal(cols, full[:, 3:])
    assert torch.equal(full.flatten(), torch.arange(8 * 6 * 6))


def test_soft_mask_is_convex_combination_and_hard_is_straight_through():
    torch.manual_seed(2)
    logits = torch.randn(5, 8, 6, requires_grad=True)
    soft = M.soft_mask(logits, tau=0.7, kappa=1.5)
    p = torch.softmax(1.5 * logits / 0.7, -1)
    torch.testing.assert_close(soft, p @ M.candidate_matrix())
    torch.testing.assert_close(soft.sum(-1), torch.full((5, 8), 2.0))
    hard = M.soft_mask(logits, tau=0.7, kappa=1.5, hard=True)
    assert torch.equal(hard.detach(), M.hard_mask(logits).float())
    hard.sum().backward()  # straight-through: gradient of the soft path
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_prior_follows_formula_and_reproduces_mask_at_high_strength():
    torch.manual_seed(4)
    logits = torch.randn(16, 32, 6) * M.LOGITS_INIT_STD
    prior = M.candidate_matrix(torch.bool)[torch.randint(0, 6, (16, 32))]
    out = M.prior_logits(logits, prior, strength=3.0)
    overlap = torch.einsum("rgc,kc->rgk", prior.float(), M.candidate_matrix())
    torch.testing.assert_close(out, logits + 3.0 * logits.std() * (overlap - 1))
    assert torch.equal(M.hard_mask(M.prior_logits(logits, prior, strength=10.0)), prior)
    with pytest.raises(ValueError, match="not 2:4"):
        M.prior_logits(logits, torch.ones(16, 32, 4, dtype=torch.bool), 3.0)


def test_mask_to_candidates_inverts_hard_mask_and_rejects_non_two_four():
    idx = torch.randint(0, 6, (9, 10))
    assert torch.equal(M.mask_to_candidates(M.candidate_matrix(torch.bool)[idx]), idx)
    bad = torch.zeros(1, 1, 4, dtype=torch.bool)
    bad[..., :3] = True
    with pytest.raises(ValueError, match="not 2:4"):
        M.mask_to_candidates(bad)


def test_regulariser_value_and_gradient_only_into_mask():
    w = torch.randn(4, 8, requires_grad=True)
    m = torch.rand(4, 2, 4, requires_grad=True)
    val = M.sparse_weight_norm_sq(w, m)
    torch.testing.assert_close(val, ((w.detach() * m.reshape(4, 8)) ** 2).sum())
    val.backward()
    assert w.grad is None and m.grad is not None


def test_not_divisible_by_four_is_an_error():
    with pytest.raises(ValueError, match="not divisible by 4"):
        M.check_groupable(10)
