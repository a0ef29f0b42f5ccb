"""iHVP solvers (ekfac, sni, lissa, astra) against dense solves on tiny models (seeds §4-5, §12.1, §12.2, §12.4)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from distributed_astra.config import SolverConfig
from distributed_astra.curvature import fit_ekfac
from distributed_astra.ihvp.ekfac import default_damping, ekfac_inverse
from distributed_astra.ihvp.monitor import CONVERGED, DIVERGED, EXACT, MAX_ITERATIONS, TRACE_COLUMNS, trace_table
from distributed_astra.ihvp.products import FisherProduct, GGNProduct, vec_take
from distributed_astra.ihvp.solvers import (
    MinibatchSampler,
    ekfac_preconditioner,
    full_batches,
    largest_eigenvalue,
    solve,
    step_size,
)
from distributed_astra.models.modules import select_tracked_modules
from tests.conftest import TinyClassifier
from tests.test_products import dense_ggn, flatten, random_vectors, rel, unflatten


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw) -> SolverConfig:
    base = dict(lr_mode="absolute", momentum=0.0, lr_decay=1.0, tolerance=0.0)
    base.update(kw)
    return SolverConfig(**base)


@pytest.fixture(scope="module")
def mlp(classifier_batch_factory):
    """Full-batch MLP problem: model, tracked (both layers), batch (24 one-token sequences), dense G, factors, λ."""
    inputs = torch.randn(24, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = TinyClassifier(inputs, hidden=6, num_classes=4)
    tracked = select_tracked_modules(model, ["hidden", "head"])
    batch = classifier_batch_factory(24, 1, 24)[0]
    g = dense_ggn(model, tracked, batch, vectorized=False)
    factors = fit_ekfac(model, tracked, lambda: classifier_batch_factory(24, 50, 400), torch.float64, seed=0)
    return model, tracked, batch, g, factors, default_damping(factors)


def dense_operator(fn, tracked) -> torch.Tensor:
    """The matrix M with fn(v) = v M (row vectors) for a linear map on direction dicts."""
    size = sum(t.shape[0] * t.shape[1] for t in tracked.values())
    return flatten(fn(unflatten(torch.eye(size, dtype=torch.float64), tracked)), list(tracked))


# ------------------------------------------------------------------------------------------- settings
def test_step_size_conventions():
    assert step_size(SolverConfig(lr=2.0, lr_mode="relative"), 0.01) == pytest.approx(0.02)
    assert step_size(SolverConfig(lr=0.3, lr_mode="absolute"), 0.01) == 0.3
    assert step_size(SolverConfig(lr=0.5, lr_mode="auto"), 0.01, mu_max=20.0) == pytest.approx(0.025)


def test_largest_eigenvalue_matches_the_dense_spectrum(mlp):
    """μ̂ of (P + λI)⁻¹(G + λI) (astra) and of G + λI (sni) by power iteration = the dense top eigenvalue."""
    model, tracked, batch, g, factors, lam = mlp
    a = g + lam * torch.eye(g.shape[0], dtype=torch.float64)
    precond = ekfac_preconditioner(factors, config(name="astra"), lam)
    v = random_vectors(tracked, 1, seed=4)
    product = GGNProduct(model, tracked)
    for fn, matrix in ((precond, dense_operator(precond, tracked) @ a), (None, a)):
        expected = float(torch.linalg.eigvals(matrix).real.max())
        estimate = largest_eigenvalue(
            product, fn, full_batches(batch), lam, v, torch.Generator().manual_seed(0), num_batches=2,
            power_iterations=300,
        )
        assert estimate == pytest.approx(expected, rel=1e-6)


def test_auto_step_is_lr_over_the_probed_eigenvalue(mlp):
    """lr_mode auto: the trace's α is cfg.lr / μ̂ (μ̂ within 10% of μ_max), and ASTRA with it converges to the dense solution (full G)."""
    model, tracked, batch, g, factors, lam = mlp
    a = g + lam * torch.eye(g.shape[0], dtype=torch.float64)
    v = random_vectors(tracked, 2, seed=5)
    cfg = config(name="astra", lr_mode="auto", lr=1.0, momentum=0.9, iterations=400)
    precond = ekfac_preconditioner(factors, cfg, lam)
    mu = float(torch.linalg.eigvals(dense_operator(precond, tracked) @ a).real.max())
    result = solve(v, precond, GGNProduct(model, tracked), full_batches(batch), cfg, lam)
    alpha = result.table().column("lr")[0].as_py()
    assert 1.0 / mu <= alpha <= 1.1 / mu  # 10 power steps approach μ from below
    exact = torch.linalg.solve(a, flatten(v, list(tracked)).T).T
    assert rel(flatten(result.x, list(tracked)), exact) <= 1e-4


def test_ekfac_solver_is_the_preconditioner(gpt2):
    model, tracked, _, factors, lam = gpt2
    v = random_vectors(tracked, 3, seed=0)
    cfg = SolverConfig(name="ekfac", preconditioner_damping=10.0)  # ignored: the EK-FAC answer is (P + λI)⁻¹ v
    result = solve(v, ekfac_preconditioner(factors, cfg, lam), None, None, cfg, lam)
    assert result.status == [EXACT] * 3 and len(result.trace) == 0
    assert rel(flatten(result.x, list(tracked)), flatten(ekfac_inverse(factors, v, lam), list(tracked))) < 1e-14


# ------------------------------------------------------------------------------------------- §12.1
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_one_astra_step_from_zero_is_the_ekfac_ihvp(gpt2, kind):
    """θ_0 = 0, α = 1, λ̃ = λ: θ_1 = (P + λI)⁻¹ v whatever the minibatch (seeds §12.1)."""
    model, tracked, batches, factors, lam = gpt2
    v = random_vectors(tracked, 4, seed=1)
    zeros = {n: torch.zeros_like(t) for n, t in v.items()}
    expected = flatten(ekfac_inverse(factors, v, lam), list(tracked))
    cfg = config(name="astra", lr=1.0, iterations=1)
    product = GGNProduct(model, tracked) if kind == "ggn" else FisherProduct(model, tracked, 1, torch.Generator())
    for seed in range(3):
        sampler = MinibatchSampler(batches, 4, torch.Generator().manual_seed(seed))
        result = solve(v, ekfac_preconditioner(factors, cfg, lam), product, sampler, cfg, lam, x0=zeros)
        assert rel(flatten(result.x, list(tracked)), expected) <= 1e-6
        assert result.status == [MAX_ITERATIONS] * 4 and result.iterations == [1] * 4


def test_astra_starts_at_the_ekfac_solution_with_its_own_damping(gpt2):
    model, tracked, batches, factors, lam = gpt2
    v = random_vectors(tracked, 2, seed=2)
    cfg = config(name="astra", iterations=0, preconditioner_damping=3 * lam)
    result = solve(v, ekfac_preconditioner(factors, cfg, lam), GGNProduct(model, tracked), iter(batches), cfg, lam)
    expected = flatten(ekfac_inverse(factors, v, 3 * lam), list(tracked))
    assert rel(flatten(result.x, list(tracked)), expected) < 1e-14


# ------------------------------------------------------------------------------------------- §12.2
def test_astra_and_sni_reach_the_dense_solution_with_full_batch_g(mlp):
    model, tracked, batch, g, factors, lam = mlp
    names = list(tracked)
    a = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    v = random_vectors(tracked, 2, seed=3)
    vflat = flatten(v, names)
    exact = torch.linalg.solve(a, vflat.T).T
    h_star = -0.5 * (vflat * exact).sum(1)
    product = GGNProduct(model, tracked)
    evals = torch.linalg.eigvalsh(a)

    # SNI, plain Eq 3 (momentum 0, no decay), α = 1/(σ_max + λ): κ ≈ 120, 2000 iterations
    cfg = config(name="sni", lr=1.0 / float(evals.max()), iterations=2000)
    sni = solve(v, None, product, full_batches(batch), cfg, lam)
    assert rel(flatten(sni.x, names), exact) <= 1e-4

    # ASTRA with heavy-ball momentum tuned to the preconditioned spectrum of (P + λI)⁻¹(G + λI)
    precond = ekfac_preconditioner(factors, SolverConfig(name="astra"), lam)
    spectrum = torch.linalg.eigvals(dense_operator(precond, tracked) @ a).real  # similar to an SPD matrix
    lo, hi = float(spectrum.min()), float(spectrum.max())
    alpha = 4.0 / (math.sqrt(hi) + math.sqrt(lo)) ** 2
    mu = ((math.sqrt(hi) - math.sqrt(lo)) / (math.sqrt(hi) + math.sqrt(lo))) ** 2
    cfg = config(name="astra", lr=alpha, momentum=mu, iterations=300)
    astra = solve(v, precond, product, full_batches(batch), cfg, lam)
    assert rel(flatten(astra.x, names), exact) <= 1e-4
    for result in (sni, astra):
        for q in range(2):
            h_last = result.trace.for_query(q)["objective"][-1]
            assert h_last == pytest.approx(float(h_star[q]), rel=1e-6)
            assert h_last < 0


# ------------------------------------------------------------------------------------------- §12.4
def test_truncated_neumann_series_is_extra_damping(mlp):
    model, tracked, batch, g, factors, lam = mlp
    names = list(tracked)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    a = g + lam * eye
    sigma, basis = torch.linalg.eigh(g)
    v = random_vectors(tracked, 2, seed=4)
    vflat = flatten(v, names)
    alpha, steps = 0.9 / float(sigma.max() + lam), 40

    # finite geometric series: α Σ_{j<J} (I − αA)^j v = A⁻¹ (I − (I − αA)^J) v, the right side in G's eigenbasis
    step = eye - alpha * a
    series = alpha * sum(torch.linalg.matrix_power(step, j) for j in range(steps))
    lhs = vflat @ series
    a_eig = sigma + lam
    rhs = ((vflat @ basis) * (1 - (1 - alpha * a_eig) ** steps) / a_eig) @ basis.T
    assert rel(lhs, rhs) < 1e-12

    # J-step SNI from 0 (Eq 3, full batch) is that truncated series
    cfg = config(name="sni", lr=alpha, iterations=steps)
    zeros = {n: torch.zeros_like(t) for n, t in v.items()}
    sni = solve(v, None, GGNProduct(model, tracked), full_batches(batch), cfg, lam, x0=zeros)
    assert rel(flatten(sni.x, names), lhs) < 1e-10

    # exp form against the damped inverse (G + (λ + 1/(αJ))I)⁻¹: ratio (1 − e^{−t})(1 + t)/t ∈ [1, 1.2985]
    def ratio(t):
        return -torch.expm1(-t) * (1 + t) / t

    t = alpha * steps * a_eig
    f_exp = -torch.expm1(-t) / a_eig
    f_inv = 1.0 / (a_eig + 1.0 / (alpha * steps))
    assert torch.allclose(f_exp / f_inv, ratio(t), rtol=1e-12)
    grid = torch.logspace(-8, 4, 200001, dtype=torch.float64)
    for r in (ratio(t), ratio(grid)):
        assert float(r.min()) >= 1 - 1e-12 and float(r.max()) <= 1.2985
    peak = int(ratio(grid).argmax())
    assert float(ratio(grid).max()) == pytest.approx(1.2985, abs=1e-4) and 1.7 < float(grid[peak]) < 1.9


# ------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize(
    "kind, iterations, tolerance, patience",
    [("ggn", 12, 0.03, 2), ("fisher", 16, 0.05, 3)],
)
def test_batched_queries_equal_separate_solves(gpt2, kind, iterations, tolerance, patience):
    model, tracked, batches, factors, lam = gpt2
    names = list(tracked)
    v = random_vectors(tracked, 3, seed=5)
    cfg = SolverConfig(
        name="astra", iterations=iterations, lr=1.0, lr_mode="relative", momentum=0.9, lr_decay=0.5, lr_decay_every=4, minibatch_size=4,
        tolerance=tolerance, patience=patience,
    )

    def run(vectors):
        if kind == "ggn":
            product = GGNProduct(model, tracked)
        else:
            product = FisherProduct(model, tracked, 1, torch.Generator().manual_seed(9))
        sampler = MinibatchSampler(batches, cfg.minibatch_size, torch.Generator().manual_seed(cfg.seed))
        return solve(vectors, ekfac_preconditioner(factors, cfg, lam), product, sampler, cfg, lam)

    together = run(v)
    assert len(set(together.iterations)) > 1, together.iterations  # queries stop at different times
    for q in range(3):
        alone = run(vec_take(v, torch.tensor([q])))
        assert rel(flatten(vec_take(together.x, torch.tensor([q])), names), flatten(alone.x, names)) < 1e-10
        assert alone.status == [together.status[q]] and alone.iterations == [together.iterations[q]]
        assert alone.trace.objective == pytest.approx(together.trace.for_query(q)["objective"], rel=1e-10)


def test_lissa_averages_independent_sni_runs(gpt2):
    model, tracked, batches, factors, lam = gpt2
    v = random_vectors(tracked, 2, seed=6)
    product = GGNProduct(model, tracked)
    cfg = config(name="lissa", lr=0.5, iterations=4, lissa_repeats=3)
    lissa = solve(v, None, product, MinibatchSampler(batches, 4, torch.Generator().manual_seed(0)), cfg, lam)
    shared = MinibatchSampler(batches, 4, torch.Generator().manual_seed(0))
    sni_cfg = config(name="sni", lr=0.5, iterations=4)
    runs = [flatten(solve(v, None, product, shared, sni_cfg, lam).x, list(tracked)) for _ in range(3)]
    assert rel(flatten(lissa.x, list(tracked)), sum(runs) / 3) < 1e-12
    assert lissa.iterations == [12, 12] and sorted(set(lissa.trace.repeat)) == [0, 1, 2]


# ------------------------------------------------------------------------------------------- monitoring
def test_divergence_stops_only_that_query_and_falls_back_to_ekfac(mlp, caplog):
    """α = 2.2/(σ_max + λ): the top eigendirection grows by 1.2x per step. Two queries live in eigendirections where
    α(σ + λ) ∈ [0.4, 1.6] (stable, fast) and converge; a random query diverges and keeps its EK-FAC solution."""
    model, tracked, batch, g, factors, lam = mlp
    names = list(tracked)
    sigma, basis = torch.linalg.eigh(g)
    a_eig = sigma + lam
    alpha = 2.2 / float(a_eig.max())
    stable = ((alpha * a_eig > 0.4) & (alpha * a_eig < 1.6)).nonzero().squeeze(1)
    assert stable.numel() >= 2
    coeff = torch.randn(2, stable.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    good = coeff @ basis[:, stable].T
    bad = torch.randn(1, g.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vflat = torch.cat([good[:1], bad, good[1:]])
    v = unflatten(vflat, tracked)
    precond = ekfac_preconditioner(factors, SolverConfig(name="sni"), lam)
    cfg = config(name="sni", lr=alpha, iterations=300, tolerance=1e-10, patience=5)
    seen = []
    with caplog.at_level(logging.WARNING, logger="distributed_astra.ihvp.monitor"):
        result = solve(
            v, precond, GGNProduct(model, tracked), full_batches(batch), cfg, lam,
            query_ids=["fact-a", "fact-b", "fact-c"], on_iteration=lambda k, h, r, lr: seen.append((k, h, r, lr)),
        )
    assert result.status == [CONVERGED, DIVERGED, CONVERGED]
    assert result.fell_back.tolist() == [False, True, False]
    assert len(result.messages) == 1
    message = result.messages[0]
    assert "query 1 (id 'fact-b')" in message and "lower solver.lr" in message and "solver.damping" in message
    assert message in caplog.text
    exact = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), vflat.T).T
    x = flatten(result.x, names)
    assert rel(x[[0, 2]], exact[[0, 2]]) < 1e-6
    assert torch.equal(x[1], flatten(precond(v), names)[1])
    assert max(result.iterations[0], result.iterations[2]) < 100 < cfg.iterations
    # trace: one row per iteration run, last row of each query carries its final status
    assert len(result.trace) == sum(result.iterations)
    for q, status in enumerate(result.status):
        rows = result.trace.for_query(q)
        assert rows["status"][-1] == status and set(rows["status"][:-1]) <= {"running"}
        assert rows["iteration"] == list(range(result.iterations[q]))
    table = trace_table(result.trace)
    assert table.column_names == list(TRACE_COLUMNS) and table.num_rows == len(result.trace)
    assert set(table.column("query_id").to_pylist()) == {"fact-a", "fact-b", "fact-c"}
    # callback: every iteration, Q values, NaN for queries that stopped
    assert [k for k, *_ in seen] == list(range(len(seen))) and all(h.shape == (3,) for _, h, _, _ in seen)
    last = seen[-1][1]
    assert math.isnan(float(last[0])) or math.isnan(float(last[2])) or math.isnan(float(last[1]))
    assert all(lr == pytest.approx(alpha) for *_, lr in seen)


def test_nan_divergence_and_decay_schedule(mlp):
    model, tracked, batch, g, factors, lam = mlp
    v = random_vectors(tracked, 2, seed=8)
    precond = ekfac_preconditioner(factors, SolverConfig(name="astra"), lam)
    cfg = config(name="astra", lr=1e200, iterations=10, patience=3)
    result = solve(v, precond, GGNProduct(model, tracked), full_batches(batch), cfg, lam)
    assert result.status == [DIVERGED, DIVERGED] and result.fell_back.all()
    assert all("NaN/Inf" in m for m in result.messages)
    assert rel(flatten(result.x, list(tracked)), flatten(precond(v), list(tracked))) < 1e-14

    cfg = config(name="astra", lr=0.1, lr_mode="relative", lr_decay=0.5, lr_decay_every=3, iterations=7)
    result = solve(v, precond, GGNProduct(model, tracked), full_batches(batch), cfg, lam)
    lrs = result.trace.for_query(0)["lr"]
    assert lrs == pytest.approx([0.1 * lam] * 3 + [0.05 * lam] * 3 + [0.025 * lam])
    assert result.status == [MAX_ITERATIONS] * 2


# ------------------------------------------------------------------------------------------- sampler
def test_minibatch_sampler(batch_factory):
    batches = batch_factory(num_batches=2, batch_size=4, seq_len=10, seed=1, prompt_len=2, empty_row=True)
    sampler = MinibatchSampler(batches, 16, torch.Generator().manual_seed(0))
    assert sampler.num_sequences == 6  # the empty row of each batch carries no loss
    first = next(sampler)
    assert first["input_ids"].shape[0] == 16 and set(first) >= {"input_ids", "attention_mask", "labels", "doc_id"}
    assert len(set(sampler.last_indices.tolist())) < 16  # with replacement
    assert bool((first["labels"][:, 1:] != -100).any(dim=1).all())
    width = first["input_ids"].shape[1]
    assert bool(first["attention_mask"][:, width - 1].any())  # no all-padding trailing column
    again = MinibatchSampler(batches, 16, torch.Generator().manual_seed(0))
    for a, b in itertools.islice(zip(MinibatchSampler(batches, 16, torch.Generator().manual_seed(0)), again), 3):
        assert all(torch.equal(a[k], b[k]) for k in a)
    full = sampler.full_batch()
    assert full["input_ids"].shape[0] == 6
    with pytest.raises(Exception, match="carries a loss"):
        MinibatchSampler({k: t[-1:] for k, t in batches[0].items()}, 4)
