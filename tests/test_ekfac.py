"""The EK-FAC preconditioner against dense references (seeds §12.7)."""

from __future__ import annotations

import pytest
import torch

from distributed_astra.curvature import EkfacFactors, fit_ekfac
from distributed_astra.errors import DastraError
from distributed_astra.ihvp import default_damping, ekfac_inverse, ekfac_matrix_function
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules

ALL = [f"transformer.h.*.{m}" for m in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj")]


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-major vec of [..., out, in+1]: index i*out + o holds m[o, i] (so vec(Ds āᵀ) = ā ⊗ Ds)."""
    return m.transpose(-1, -2).reshape(*m.shape[:-2], -1)


def unvec(v: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    return v.reshape(*v.shape[:-1], inp, out).transpose(-1, -2)


def dense_block(factors: EkfacFactors, name: str, strategy: str = "ekfac") -> torch.Tensor:
    """(Q_A ⊗ Q_S) diag(vec eig) (Q_A ⊗ Q_S)ᵀ built explicitly: [out*(in+1)]²."""
    f = factors[name]
    q = torch.kron(f.q_a, f.q_s)
    return q @ torch.diag(vec(factors.eigenvalues(name, strategy))) @ q.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gpt2_factors(tiny_gpt2_factory, batch_factory):
    model = prepare_for_attribution(tiny_gpt2_factory(seed=1))
    tracked = select_tracked_modules(model, ALL)
    batches = batch_factory(num_batches=4, batch_size=6, seq_len=16, seed=4, prompt_len=2, empty_row=True)
    return fit_ekfac(model, tracked, lambda: batches, torch.float64, seed=3), tracked


# ------------------------------------------------------------------------------ (a) true Fisher, one layer
def test_ekfac_is_closer_than_kfac_to_the_exact_fisher(tiny_classifier, classifier_batch_factory):
    """One nn.Linear (the head of a tiny classifier): the exact true-Fisher block by enumerating classes,
    F = (1/N) Σ_n ā_n ā_nᵀ ⊗ (diag p_n − p_n p_nᵀ), against KFAC and EK-FAC fitted from sampled labels."""
    model, n = tiny_classifier
    tracked = select_tracked_modules(model, ["head"])
    batches = classifier_batch_factory(n, repeats=500, batch_size=3000)
    factors = fit_ekfac(model, tracked, lambda: batches, torch.float64, seed=0)
    f = factors["head"]
    assert factors.num_tokens == factors.num_sequences == factors.num_lambda_sequences == 500 * n
    assert factors.tokens_per_sequence == 1.0

    with torch.no_grad():
        idx = torch.arange(n)
        abar = model.features(idx)  # [n, in+1]
        p = torch.softmax(model.head(abar[:, :-1]), dim=-1)  # [n, C]
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # output-space Hessian of CE per example
    fisher = sum(torch.kron(torch.outer(abar[i], abar[i]), h[i]) for i in range(n)) / n

    # pass 1 against its exact expectation: A is label-free (exact), S is a Monte-Carlo estimate of mean(h)
    a_exact = abar.T @ abar / n
    s_exact = h.mean(0)
    assert rel(f.q_a @ torch.diag(f.eigval_a) @ f.q_a.T, a_exact) < 1e-12
    assert rel(f.q_s @ torch.diag(f.eigval_s) @ f.q_s.T, s_exact) < 0.05

    q = torch.kron(f.q_a, f.q_s)
    lambda_exact = unvec(torch.diagonal(q.T @ fisher @ q), *f.shape)  # the Frobenius-optimal diagonal
    assert rel(f.lambda_, lambda_exact) < 0.05

    err = lambda g: float((g - fisher).norm())
    err_kfac = err(dense_block(factors, "head", "kfac"))
    err_ekfac = err(dense_block(factors, "head", "ekfac"))
    oracle = q @ torch.diag(vec(lambda_exact)) @ q.T
    assert err(oracle) <= err_kfac  # exact in the fixed basis
    assert err_ekfac <= err_kfac, (err_ekfac, err_kfac)
    # In the common basis the error splits into an off-diagonal part (shared by all three) and a diagonal part:
    # EK-FAC's diagonal error is sampling noise only, far below KFAC's, so the ordering is not sampling luck.
    diag_err_kfac = float((factors.kfac_eigenvalues("head") - lambda_exact).norm())
    diag_err_ekfac = float((f.lambda_ - lambda_exact).norm())
    assert diag_err_ekfac < 0.25 * diag_err_kfac, (diag_err_ekfac, diag_err_kfac)
    assert err_ekfac**2 == pytest.approx(err(oracle) ** 2 + diag_err_ekfac**2, rel=1e-8)
    assert err_kfac**2 == pytest.approx(err(oracle) ** 2 + diag_err_kfac**2, rel=1e-8)


# ----------------------------------------------------------------------- (b) dense (G_EKFAC + λI)⁻¹ v
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_inverse_equals_dense_solve(gpt2_factors, strategy):
    factors, tracked = gpt2_factors
    damping = default_damping(factors, strategy)
    g = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(3, *tm.shape, generator=g, dtype=torch.float64) for name, tm in tracked.items()}
    ours = ekfac_inverse(factors, grads, damping, strategy)
    for name, tm in tracked.items():
        dense = dense_block(factors, name, strategy)
        assert rel(dense, dense.T) < 1e-14
        system = dense + damping * torch.eye(dense.shape[0], dtype=torch.float64)
        expected = unvec(torch.linalg.solve(system, vec(grads[name]).T).T, *tm.shape)
        assert ours[name].shape == grads[name].shape and ours[name].dtype == torch.float64
        assert rel(ours[name], expected) <= 1e-8, name
        # un-batched input, and the forward product G v
        assert rel(ekfac_inverse(factors, {name: grads[name][0]}, damping, strategy)[name], expected[0]) <= 1e-8
        gv = ekfac_matrix_function(factors, {name: grads[name]}, lambda s: s, strategy)[name]
        assert rel(gv, unvec((dense @ vec(grads[name]).T).T, *tm.shape)) <= 1e-10


def test_matrix_exponential_matches_dense(gpt2_factors):
    """§12.7(d): exp(−c G_EKFAC) v through the eigenvalues equals torch.linalg.matrix_exp on the dense block."""
    factors, tracked = gpt2_factors
    name = "transformer.h.0.attn.c_proj"
    c = 1.0 / float(factors[name].lambda_.mean())
    v = torch.randn(*tracked[name].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = ekfac_matrix_function(factors, {name: v}, lambda s: torch.exp(-c * s))[name]
    expected = unvec(torch.linalg.matrix_exp(-c * dense_block(factors, name)) @ vec(v), *v.shape)
    assert rel(ours, expected) < 1e-10


def test_inverse_casts_low_precision_gradients(gpt2_factors):
    factors, tracked = gpt2_factors
    name = "transformer.h.1.mlp.c_fc"
    v = torch.randn(2, *tracked[name].shape, generator=torch.Generator().manual_seed(2))
    out32 = ekfac_inverse(factors, {name: v}, 1e-2)[name]
    out16 = ekfac_inverse(factors, {name: v.bfloat16()}, 1e-2)[name]
    assert out32.dtype == out16.dtype == torch.float64
    assert rel(out16, out32) < 2e-2


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(gpt2_factors):
    factors, _ = gpt2_factors
    all_lambda = torch.cat([factors[n].lambda_.reshape(-1) for n in factors.names])
    assert default_damping(factors) == pytest.approx(0.1 * float(all_lambda.mean()), rel=1e-12)
    all_kfac = torch.cat([factors.kfac_eigenvalues(n).reshape(-1) for n in factors.names])
    assert default_damping(factors, "kfac") == pytest.approx(0.1 * float(all_kfac.mean()), rel=1e-12)


def test_kfac_and_ekfac_share_the_per_sequence_scale(gpt2_factors):
    """tr(G_EKFAC) = Σ Λ = (1/N) Σ_n |DW̄_n|²; KFAC is rescaled by tokens/sequence onto the same scale
    (cross-token correlations make the two differ, but not by the ~tokens-per-sequence factor)."""
    factors, _ = gpt2_factors
    assert factors.tokens_per_sequence > 5
    for name in factors.names:
        ratio = float(factors.kfac_eigenvalues(name).sum() / factors[name].lambda_.sum())
        assert 1 / 4 < ratio < 4, (name, ratio)


def test_inverse_rejects_bad_inputs(gpt2_factors):
    factors, tracked = gpt2_factors
    name = "transformer.h.0.mlp.c_fc"
    good = {name: torch.zeros(*tracked[name].shape, dtype=torch.float64)}
    with pytest.raises(DastraError, match="shape"):
        ekfac_inverse(factors, {name: torch.zeros(17, 64, dtype=torch.float64)}, 1e-3)  # transposed layout
    with pytest.raises(DastraError, match="no EK-FAC factors for module 'lm_head'"):
        ekfac_inverse(factors, {"lm_head": torch.zeros(64, 16)}, 1e-3)
    with pytest.raises(DastraError, match="not one of"):
        ekfac_inverse(factors, good, 1e-3, strategy="diagonal")
    with pytest.raises(DastraError, match="non-negative"):
        ekfac_inverse(factors, good, -1.0)
