"""A float64 plain-PyTorch reference of the training mask and per-element float32 error bounds.

Kernel-vs-reference tests compare float32 results (the fused C kernel, the PyTorch path) with
this reference, computed in float64 by autograd, within bounds from the error analysis below.
The bounds hold for every input, so the tests do not depend on which inputs a seed draws.

Error analysis (``u = 2^-24``, float32 unit roundoff; ``a = kappa / tau``, ``b = 1 / tau``).
Per group of 4 weights the mask softmaxes six scores ``z_k = a l_k + b g_k`` (``g`` the Gumbel
noise ``-log(-log U)``, ``U`` exact in float32) and sums candidate probabilities
``m_j = sum_{k keeps j} p_k``.

* Scores: ``a l`` costs 2 roundings (``a`` itself and the product); the noise two vectorised logs
  (<= 4 ulp = 8u each, ``-ffast-math``'s libmvec included: the first log's relative error
  becomes an absolute error of ``g``) and two roundings. So
  ``|dz_k| <= C_Z u (a |l_k| + b (1 + |g_k|))`` with ``C_Z = 12``; ``Delta`` is its group max.
* Probabilities: ``p = softmax(z)`` perturbs to first order as ``dp_k = p_k (dz_k - sum_c p_c
  dz_c)``, at most ``2 Delta p_k``; ``exp`` (<= 8u), the 6-term sum (5u, any order: ``-ffast-math``
  reassociation is covered), the reciprocal (``rcp`` + Newton, <= 4u) and the product add
  ``<= 32u`` relative. The kernel clamps exponents at -80 (torch underflows to 0 near -87), an
  absolute error ``<= P_ABS = e^-80`` per probability. Hence ``|dp_k| <= e_k = p_k (3 Delta +
  32u) + P_ABS``. Softmax amplifies the *absolute* score error: at ``kappa / tau = 80`` and
  ``|l| ~ 1``, ``Delta ~ 1e-4``, which is why a float32 reference is not exact to 1e-4.
* Soft mask ``|dm_j| <= sum_{k keeps j} e_k + 2u m_j``; hard masks are exact given the same
  choice. Output ``out = w m``: ``|w| (|dm| + u m)``; weight gradient ``grad_out * m``:
  ``|grad_out| (|dm| + u m) + E_j m_j`` where ``E`` bounds the error of ``grad_out`` itself.
* Logit gradient ``a p_k (G_k - D)``, ``G_k = sum_{j in k} q_j``, ``q = grad_out w + r w^2 m``
  (``r`` the regulariser's scale), ``D = sum_c p_c G_c``. With ``M = max_k sum_{j in k} |q_j|``
  (so ``|G_k|, |D| <= M``) and ``ME = max_k sum_{j in k} dq_j`` (the input error of ``q``):
  ``|dG_k| <= ME + uM``, ``|dD| <= (sum_c e_c) M + ME + 7uM`` and
  ``|d grad_k| <= a (2 e_k M + p_k (2 ME + (sum_c e_c + 14u) M))``.
* Hard masks: the two implementations may pick different candidates only where the top two
  scores lie within ``2 (3 Delta + 32u)`` (their log-probabilities' error); such near-tied groups
  get the implementation's own choice, which must be one of the near-tied candidates.

The reference itself is float64 autograd through ``torch.softmax`` (error ~1e-16, ignored).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from megatron.sparse import mask as M

U = 2.0 ** -24
C_Z = 12.0
P_ABS = math.exp(-80.0)
STRESS_ENV = "MEGATRON_SPARSE_KERNEL_STRESS"


def stress_seeds(default: int = 6) -> range:
    """Seeds of a kernel comparison: ``MEGATRON_SPARSE_KERNEL_STRESS=N`` runs N of them."""
    return range(int(os.environ.get(STRESS_ENV, default)))


@dataclasses.dataclass
class Reference:
    """Float64 results of one sample and the float32 error bound of each element."""

    out: torch.Tensor
    grad_logits: torch.Tensor
    grad_weight: torch.Tensor | None
    sq_norm: torch.Tensor
    tol_out: torch.Tensor
    tol_grad_logits: torch.Tensor
    tol_grad_weight: torch.Tensor | None
    tol_sq_norm: float
    near_ties: int
    """Hard-mask groups whose top two scores are within the rounding bound."""
    bad_choices: int
    """Groups where the implementation picked a candidate outside the near-tied set."""


def candidate_of(mask_groups: torch.Tensor) -> torch.Tensor:
    """Index of each ``[.., 4]`` 0/1 group among the six 2:4 candidates (-1 if none)."""
    table = M.candidate_matrix(torch.float64)
    match = (mask_groups.double().unsqueeze(-2) == table).all(-1)
    return torch.where(match.any(-1), match.double().argmax(-1), torch.tensor(-1))


def noise64(logits: torch.Tensor, index, sample) -> torch.Tensor:
    """The sample's Gumbel noise in float64 from the same counter-based uniforms."""
    if not sample.noise:
        return torch.zeros(logits.shape, dtype=torch.float64)
    uniform = M.counter_uniform(sample.seed, index.logit_counters(logits.shape[1])).double()
    return -torch.log(-torch.log(uniform))


def reference(weight, logits, index, sample, *, grad_out, reg_scale: float = 0.0,
              grad_out_err: torch.Tensor | None = None, choice: torch.Tensor | None = None,
              with_weight_grad: bool = True) -> Reference:
    """Float64 ``out = w * mask`` and the gradients of ``<grad_out, out> + reg_scale / 2 *
    ||sg(w) mask||^2``, with per-element float32 bounds (module docstring).

    ``grad_out_err`` bounds the error of a float32 ``grad_out`` (default 0: exact input);
    ``choice`` is the implementation's hard candidate per group (``[rows, groups]``).
    """
    a, b = sample.kappa / sample.tau, 1.0 / sample.tau
    l64 = logits.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(with_weight_grad)
    g = noise64(logits, index, sample)
    z = a * l64 + b * g
    probs = torch.softmax(z, dim=-1)
    table = M.candidate_matrix(torch.float64)
    soft = probs @ table
    delta = C_Z * U * (a * l64.detach().abs() + b * (1 + g.abs())).amax(-1, keepdim=True)
    eps_rel = 3 * delta + 32 * U
    near_ties = bad = 0
    if sample.hard:
        zs = z.detach()
        top2 = zs.topk(2, dim=-1).values
        tied = (top2[..., 0] - top2[..., 1]) <= 2 * eps_rel[..., 0]
        allowed = zs >= zs.amax(-1, keepdim=True) - 2 * eps_rel
        pick = zs.argmax(-1)
        if choice is not None:
            ok = allowed.gather(-1, choice.clamp_min(0).unsqueeze(-1))[..., 0] & (choice >= 0)
            bad = int((~ok).sum())
            pick = torch.where(tied & ok, choice, pick)
        near_ties = int(tied.sum())
        hard = table[pick]
        mask_g = hard + soft - soft.detach()
    else:
        mask_g = soft
    mask = M.groups_to_weight(mask_g)
    out = w64 * mask
    sq = (w64.detach() * mask).pow(2).sum()
    go = grad_out.double()
    ((out * go).sum() + reg_scale / 2 * sq).backward()

    p = probs.detach()
    e = p * eps_rel + P_ABS                                      # |dp_k|
    m = mask.detach()
    if sample.hard:
        tol_m = torch.zeros_like(m)
    else:
        tol_m = M.groups_to_weight(e @ table + 2 * U * soft.detach())
    w = w64.detach()
    err_go = torch.zeros_like(go) if grad_out_err is None else grad_out_err.double()
    tol_out = w.abs() * (tol_m + U * m)
    tol_gw = go.abs() * (tol_m + U * m) + err_go * m
    q_abs = go.abs() * w.abs() + abs(reg_scale) * w.pow(2) * m
    q_err = err_go * w.abs() + abs(reg_scale) * w.pow(2) * tol_m + 2 * U * q_abs
    big_m = (M.weight_to_groups(q_abs) @ table.t()).amax(-1, keepdim=True)
    big_me = (M.weight_to_groups(q_err) @ table.t()).amax(-1, keepdim=True)
    tol_gl = a * (2 * e * big_m + p * (2 * big_me + (e.sum(-1, keepdim=True) + 14 * U) * big_m))
    wm = (w * m).abs()
    tol_sq = float((2 * wm * tol_out).sum() + 70 * U * wm.pow(2).sum())
    return Reference(out=out.detach(), grad_logits=l64.grad, sq_norm=sq.detach(),
                     grad_weight=w64.grad if with_weight_grad else None,
                     tol_out=tol_out, tol_grad_logits=tol_gl, tol_grad_weight=tol_gw,
                     tol_sq_norm=tol_sq, near_ties=near_ties, bad_choices=bad)


def excess(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> float:
    """Largest ``|actual - expected| / tol`` (<= 1 passes); the bound has a 1e-30 floor."""
    return float(((actual.double() - expected).abs() / (tol + 1e-30)).max())


def assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor,
                  tol: torch.Tensor) -> None:
    """Every element of ``actual`` within its bound of the float64 ``expected``."""
    diff = (actual.double() - expected).abs()
    bad = diff > tol + 1e-30
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements outside the "
                             f"float32 error bound, e.g. {i}: {float(actual[i]):.9g} vs float64 "
                             f"{float(expected[i]):.9g} (bound {float(tol[i]):.3g})")
