"""SOURCE and ASTRA-SOURCE (seeds §6-7) against independent references: dense float64 matrices,
torch.linalg.matrix_exp, and explicitly unrolled SGD (seeds §12.5, §12.6)."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_astra.config import SolverConfig
from distributed_astra.curvature import EkfacFactors, ModuleFactors, fit_ekfac
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import ekfac_inverse
from distributed_astra.ihvp.products import GGNProduct
from distributed_astra.ihvp.solvers import ekfac_preconditioner, full_batches
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.source import (
    CheckpointRecord,
    OptimizerSettings,
    Trajectory,
    TrajectoryRecorder,
    adam_preconditioner_rms,
    astra_source_directions,
    average_ekfac,
    average_states,
    fit_segment_ekfac,
    if_damping,
    load_trajectory,
    save_trajectory,
    segment_trajectory,
    source_directions,
    source_scores,
)
from tests.conftest import TinyClassifier, classifier_batches
from tests.test_ekfac import dense_block, vec
from tests.test_products import dense_ggn, flatten, random_vectors, rel
from tests.test_solvers import dense_operator

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- helpers
def constant_trajectory(steps: int, lr: float, checkpoint_steps: list[int], momentum: float = 0.0,
                        weight_decay: float = 0.0) -> Trajectory:
    """A trajectory without states: enough for segmenting."""
    records = [CheckpointRecord(s, f"c{s}") for s in checkpoint_steps]
    return Trajectory(OptimizerSettings("sgd", momentum, weight_decay), 8, 64, [lr] * steps, records)


def dense_ekfac(factors: EkfacFactors) -> torch.Tensor:
    """Block-diagonal G_EKFAC over modules, column-major vec per module (`tests/test_ekfac.vec`)."""
    return torch.block_diag(*(dense_block(factors, n) for n in factors.names))


def cm(x: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """[Q, D] in the column-major layout of `dense_ekfac`."""
    return torch.cat([vec(x[n]) for n in names], dim=-1)


def dense_response(g: torch.Tensor, horizon: float) -> torch.Tensor:
    """(I − e^{−cG}) G⁻¹ = c·φ₁(−cG), read off exp([[−cG, I], [0, 0]]) (valid for singular G)."""
    d = g.shape[0]
    block = torch.zeros(2 * d, 2 * d, dtype=g.dtype)
    block[:d, :d] = -horizon * g
    block[:d, d:] = torch.eye(d, dtype=g.dtype)
    return horizon * torch.linalg.matrix_exp(block)[:d, d:]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def classifier_factors():
    """Three different tiny classifiers (segments) with tracked hidden + head and their fitted EK-FAC."""
    inputs = torch.randn(24, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    out = []
    for seed in range(3):
        model = TinyClassifier(inputs, hidden=6, num_classes=4, seed=seed, scale=1.0 + 0.5 * seed)
        tracked = select_tracked_modules(model, ["hidden", "head"])
        factors = fit_ekfac(model, tracked, lambda: classifier_batches(24, 40, 480), DT, seed=seed)
        out.append((model, tracked, factors))
    return out


# ------------------------------------------------------------------------------------------- §12.5c, segments
def test_momentum_scaling_reproduces_the_mnist_damping():
    """MNIST (seeds §10.2): η = 0.03, μ = 0.9, T = 1920 (20 epochs × 96 steps), L = 3 → K = 640, λ = 0.0052."""
    traj = constant_trajectory(1920, 0.03, [0, 640, 1280, 1920], momentum=0.9)
    segments = segment_trajectory(traj, 3)
    assert [s.num_steps for s in segments] == [640, 640, 640]
    assert [s.checkpoints for s in segments] == [(0, 1), (2,), (3,)]
    for s in segments:
        assert s.effective_lr == pytest.approx(0.3)
        assert s.implicit_damping == pytest.approx(1 / 192)
        assert round(s.implicit_damping, 4) == 0.0052
    assert if_damping(segments) == pytest.approx(1 / 192)
    # FashionMNIST-N: η = 0.01, 3 epochs × 96 steps → 1/(0.1·96) = 0.104 ≈ 0.10
    noisy = segment_trajectory(constant_trajectory(288, 0.01, [96, 192, 288], momentum=0.9), 3)
    assert [round(s.implicit_damping, 2) for s in noisy] == [0.10] * 3
    # without the terminal-velocity factor the damping would be 10x larger
    plain = segment_trajectory(constant_trajectory(1920, 0.03, [640, 1280, 1920]), 3)
    assert plain[0].implicit_damping == pytest.approx(10 / 192)


def test_segments_follow_the_learning_rate_schedule_and_weight_decay():
    lrs = [0.1] * 5 + [0.05] * 5 + [0.01] * 2
    traj = Trajectory(OptimizerSettings("sgd", 0.5, 0.01), 4, 40, lrs,
                      [CheckpointRecord(s, f"c{s}") for s in (3, 8, 12)])
    segments = segment_trajectory(traj, 3)
    assert [(s.start, s.end) for s in segments] == [(0, 4), (4, 8), (8, 12)]
    assert segments[1].mean_lr == pytest.approx((0.1 + 0.05 * 3) / 4)
    assert segments[1].effective_lr == pytest.approx(segments[1].mean_lr / 0.5)
    assert segments[2].damping == pytest.approx(1 / (segments[2].effective_lr * 4) + 0.01)
    with pytest.raises(DastraError, match="segment 1 .* has no checkpoint"):
        segment_trajectory(Trajectory(traj.optimizer, 4, 40, lrs, [CheckpointRecord(s, "x") for s in (3, 12)]), 3)
    with pytest.raises(DastraError, match="number of SOURCE segments"):
        segment_trajectory(traj, 13)


# ------------------------------------------------------------------------------------------- trajectory I/O
def test_recorded_trajectory_round_trips_and_adam_rms(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    rec = TrajectoryRecorder(OptimizerSettings("adamw", 0.9, 0.1), batch_size=4, num_train=16, info={"task": "toy"})
    rec.checkpoint(model, opt)
    for step in range(6):
        opt.zero_grad()
        ((model(x[step % 4 * 4:][:4]) - y[step % 4 * 4:][:4]) ** 2).mean().backward()
        opt.step()
        rec.step(0.01 * (1 - step / 6), model, opt, save=step % 2 == 1)
    traj = rec.trajectory
    assert traj.steps == [0, 2, 4, 6] and traj.num_steps == 6
    # √v̂ + ε by hand
    sq, n = 0.0, 0
    for p in model.parameters():
        st = opt.state[p]
        sq += float(((st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))).sqrt() + 1e-8).sum())
        n += p.numel()
    assert traj.checkpoints[-1].preconditioner_rms == pytest.approx(sq / n, rel=1e-12)
    assert adam_preconditioner_rms(opt) == pytest.approx(sq / n, rel=1e-12)
    assert traj.checkpoints[0].preconditioner_rms == pytest.approx(1e-8)  # no second moment yet

    save_trajectory(traj, tmp_path / "traj")
    loaded = load_trajectory(tmp_path / "traj")
    assert loaded.learning_rates == traj.learning_rates and loaded.steps == traj.steps
    assert loaded.optimizer == traj.optimizer and loaded.info == {"task": "toy"}
    for i in range(4):
        for k, v in traj.state(i).items():
            assert torch.equal(loaded.state(i)[k], v)
    assert not torch.equal(loaded.state(0)["0.weight"], loaded.state(3)["0.weight"])

    # Adam mapping: η_eff = η̄ / mean(√v̂ + ε); AdamW's decoupled decay becomes the shift wd·rms
    seg = segment_trajectory(loaded, 1)[0]
    rms = sum(c.preconditioner_rms for c in loaded.checkpoints) / 4
    assert seg.effective_lr == pytest.approx(sum(traj.learning_rates) / 6 / rms)
    assert seg.shift == pytest.approx(0.1 * rms)

    (tmp_path / "traj" / loaded.checkpoints[2].file).unlink()
    with pytest.raises(DastraError, match="step_00000004.safetensors' is missing"):
        load_trajectory(tmp_path / "traj")
    with pytest.raises(DastraError, match="no trajectory at"):
        load_trajectory(tmp_path / "nowhere")
    with pytest.raises(DastraError, match="optimizer 'lbfgs' is not one of"):
        OptimizerSettings("lbfgs")


# ------------------------------------------------------------------------------------------- averaging (§6.3)
def test_average_ekfac_is_the_best_diagonal_of_the_mean_in_the_common_basis(classifier_factors):
    factors = [f for _, _, f in classifier_factors]
    avg = average_ekfac(factors)
    for name in avg.names:
        a_mean = sum(f[name].q_a @ torch.diag(f[name].eigval_a) @ f[name].q_a.T for f in factors) / 3
        s_mean = sum(f[name].q_s @ torch.diag(f[name].eigval_s) @ f[name].q_s.T for f in factors) / 3
        m = avg[name]
        assert rel(m.q_a @ torch.diag(m.eigval_a) @ m.q_a.T, a_mean) < 1e-12
        assert rel(m.q_s @ torch.diag(m.eigval_s) @ m.q_s.T, s_mean) < 1e-12
        basis = torch.kron(m.q_a, m.q_s)
        mean_g = sum(dense_block(f, name) for f in factors) / 3
        assert rel(vec(m.lambda_), torch.diagonal(basis.T @ mean_g @ basis)) < 1e-12
    # one checkpoint: unchanged
    same = average_ekfac(factors[:1])
    assert rel(dense_ekfac(same), dense_ekfac(factors[0])) < 1e-12


def test_fit_segment_ekfac_uses_the_mean_covariances_and_their_common_basis():
    inputs = torch.randn(24, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    models = [TinyClassifier(inputs, hidden=6, num_classes=4, seed=s) for s in (0, 1)]
    checkpoints = [(m, select_tracked_modules(m, ["head"])) for m in models]
    fitted = fit_segment_ekfac(lambda: checkpoints, lambda: classifier_batches(24, 200, 1200), DT, seed=0)
    idx = torch.arange(24)
    a_mean = sum(m.features(idx).T @ m.features(idx) / 24 for m in models) / 2  # exact, no label sampling
    f = fitted["head"]
    assert rel(f.q_a @ torch.diag(f.eigval_a) @ f.q_a.T, a_mean) < 1e-12
    # Λ̄ against the exact Fisher blocks (1/N) Σ ā āᵀ ⊗ (diag p − p pᵀ), averaged, in the common basis
    fishers = []
    for m in models:
        abar = m.features(idx)
        p = torch.softmax(m.head(abar[:, :-1]), dim=-1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        fishers.append(sum(torch.kron(torch.outer(abar[i], abar[i]), h[i]) for i in range(24)) / 24)
    basis = torch.kron(f.q_a, f.q_s)
    expected = torch.diagonal(basis.T @ (sum(fishers) / 2) @ basis)
    assert rel(vec(f.lambda_), expected) < 0.05  # Monte-Carlo labels: 2 × 4800 draws
    # one checkpoint: exactly the ordinary fit (same passes, same label draws)
    make = lambda: classifier_batches(24, 5, 120)  # noqa: E731
    single = fit_segment_ekfac(lambda: checkpoints[:1], make, DT, seed=3)["head"]
    plain = fit_ekfac(*checkpoints[0], make, DT, seed=3)["head"]
    assert torch.equal(single.lambda_, plain.lambda_) and torch.equal(single.q_s, plain.q_s)
    states = average_states([m.state_dict() for m in models])
    assert torch.allclose(states["head.weight"], (models[0].head.weight + models[1].head.weight) / 2)


# ------------------------------------------------------------------------------------------- §12.5a
def test_one_segment_source_is_if_with_the_implied_damping_per_eigenvalue(classifier_factors):
    _, tracked, factors = classifier_factors[0]
    names = list(tracked)
    g = dense_ekfac(factors)
    sigma, basis = torch.linalg.eigh(g)
    nonzero = sigma[sigma > 1e-10 * sigma.max()]  # the rest is round-off (≤ 1e-13 of max here)
    horizon = 1.79 / float(nonzero.median())  # puts the peak of the ratio inside the spectrum
    steps = 50
    seg = segment_trajectory(constant_trajectory(steps, horizon / steps, [steps]), 1)
    assert seg[0].horizon == pytest.approx(horizon)
    v = random_vectors(tracked, 3, seed=0)

    src = source_directions(v, [factors], seg, "exp")[0]
    inv = ekfac_inverse(factors, v, seg[0].implicit_damping)
    # the exp form against matrix_exp on the dense EK-FAC matrix
    assert rel(cm(src, names), cm(v, names) @ dense_response(g, horizon)) < 1e-10
    # the damped variant is exactly IF with λ = 1/(η̄K)
    damped = source_directions(v, [factors], seg, "damped")[0]
    assert rel(cm(damped, names), cm(inv, names)) < 1e-12

    ratio = (cm(src, names) @ basis) / (cm(inv, names) @ basis)  # per eigen-direction, per query
    assert float(ratio.min()) >= 1 - 1e-9 and float(ratio.max()) <= 1.2985
    assert float(ratio.max()) > 1.28  # the bound is attained near c·σ = 1.79
    t = horizon * sigma.clamp_min(0)
    expected = torch.where(t > 0, -torch.expm1(-t) * (1 + t) / t.clamp_min(1e-300), torch.ones_like(t))
    assert torch.allclose(ratio, expected.expand_as(ratio), rtol=1e-7)


def test_multi_segment_source_equals_the_dense_formula(classifier_factors):
    """Eq 16 with three different curvatures, a schedule and weight decay, against dense matrix exponentials."""
    factors = [f for _, _, f in classifier_factors]
    names = factors[0].names
    lrs = [0.2] * 10 + [0.1] * 10 + [0.05] * 10
    traj = Trajectory(OptimizerSettings("sgd", 0.5, 0.02), 4, 24, lrs,
                      [CheckpointRecord(s, f"c{s}") for s in (10, 20, 30)])
    segments = segment_trajectory(traj, 3)
    q = random_vectors(classifier_factors[0][1], 2, seed=1)
    eye = torch.eye(dense_ekfac(factors[0]).shape[0], dtype=DT)
    gs = [dense_ekfac(f) + s.shift * eye for f, s in zip(factors, segments)]
    forget = [torch.linalg.matrix_exp(-s.horizon * g) for g, s in zip(gs, segments)]
    for variant in ("exp", "damped"):
        got = source_directions(q, factors, segments, variant)
        u = cm(q, names)
        for ell in (2, 1, 0):
            if variant == "exp":
                resp = dense_response(gs[ell], segments[ell].horizon)
            else:
                resp = torch.linalg.inv(gs[ell] + eye / segments[ell].horizon)
            assert rel(cm(got[ell], names), u @ resp) < 1e-10, (variant, ell)
            u = u @ forget[ell]
    # scores: Σ_ℓ mean over the segment's checkpoints
    w = source_directions(q, factors, segments, "exp")
    grads = [[random_vectors(classifier_factors[0][1], 5, seed=10 + 3 * ell + c) for c in range(ell + 1)]
             for ell in range(3)]
    expected = sum(sum(cm(w[ell], names) @ cm(g, names).T for g in grads[ell]) / (ell + 1) for ell in range(3))
    assert rel(source_scores(w, grads), expected) < 1e-12


# ------------------------------------------------------------------------------------------- §12.6, ASTRA-SOURCE
def test_astra_source_with_zero_iterations_is_damped_ekfac_source_and_converges_to_dense(classifier_factors):
    models = [m for m, _, _ in classifier_factors]
    trackeds = [t for _, t, _ in classifier_factors]
    factors = [f for _, _, f in classifier_factors]
    names = list(trackeds[0])
    lam0 = float(sum(f["head"].lambda_.mean() for f in factors)) / 30
    steps = 30
    traj = constant_trajectory(steps, 3 / (steps * lam0), [10, 20, 30])  # λ_ℓ = 1/(η K_ℓ) ≈ 0.1·mean Λ
    segments = segment_trajectory(traj, 3)
    q = random_vectors(trackeds[0], 2, seed=2)
    batch = classifier_batches(24, 1, 24)[0]
    products = [GGNProduct(m, t) for m, t in zip(models, trackeds)]

    zero = SolverConfig(name="astra", iterations=0)
    results = astra_source_directions(q, factors, segments, products, [full_batches(batch)] * 3, zero)
    damped = source_directions(q, factors, segments, "damped")
    for r, d in zip(results, damped):
        assert rel(flatten(r.x, names), flatten(d, names)) < 1e-12

    # with iterations and the full-batch GGN of each segment's model: (Ḡ_ℓ + λ_ℓI)⁻¹ u_ℓ, u_ℓ from EK-FAC S̄
    eye = torch.eye(sum(t.shape[0] * t.shape[1] for t in trackeds[0].values()), dtype=DT)
    u = cm(q, names)
    expected = [None] * 3
    for ell in (2, 1, 0):
        ggn = dense_ggn(models[ell], trackeds[ell], batch, vectorized=False)  # row-major flatten
        rhs = flatten(unflatten_cm(u, trackeds[0]), names)
        expected[ell] = torch.linalg.solve(ggn + segments[ell].damping * eye, rhs.T).T
        u = u @ torch.linalg.matrix_exp(-segments[ell].horizon * dense_ekfac(factors[ell]))
    configs = []
    for ell in range(3):
        lam = segments[ell].damping
        ggn = dense_ggn(models[ell], trackeds[ell], batch, vectorized=False)
        precond = ekfac_preconditioner(factors[ell], SolverConfig(name="astra"), lam)
        spectrum = torch.linalg.eigvals(dense_operator(precond, trackeds[ell]) @ (ggn + lam * eye)).real
        lo, hi = float(spectrum.min()), float(spectrum.max())
        configs.append((4.0 / (math.sqrt(hi) + math.sqrt(lo)) ** 2,
                        ((math.sqrt(hi) - math.sqrt(lo)) / (math.sqrt(hi) + math.sqrt(lo))) ** 2))
    for ell in range(3):  # each segment with its own tuned step (one solve per segment keeps the test exact)
        alpha, mu = configs[ell]
        cfg = SolverConfig(name="astra", iterations=300, lr=alpha, lr_mode="absolute", momentum=mu, lr_decay=1.0,
                           tolerance=0.0)
        out = astra_source_directions(q, factors, segments, products, [full_batches(batch)] * 3, cfg)
        assert rel(flatten(out[ell].x, names), expected[ell]) < 1e-6, ell
        if ell == 0:
            assert rel(flatten(out[0].x, names), flatten(results[0].x, names)) > 1e-3  # ASTRA moved

    with pytest.raises(DastraError, match="runs the astra solver"):
        astra_source_directions(q, factors, segments, products, [full_batches(batch)] * 3, SolverConfig(name="ekfac"))
    with pytest.raises(DastraError, match="one EK-FAC per segment"):
        source_directions(q, factors[:2], segments)


def unflatten_cm(u: torch.Tensor, tracked) -> dict[str, torch.Tensor]:
    """Inverse of `cm`: column-major per-module vectors back to {module: [Q, out, in+1]}."""
    out, start = {}, 0
    for name, t in tracked.items():
        o, i = t.shape
        out[name] = u[:, start : start + o * i].reshape(-1, i, o).transpose(1, 2)
        start += o * i
    return out


# ------------------------------------------------------------------------------------------- §12.5b
def unrolled_linear_regression(momentum: float, weight_decay: float, runs: int, seed: int = 0):
    """SGD (heavy-ball, coupled decay) on ½(θᵀx̄ − y)², 3 epochs of reshuffled batches, differentiated exactly
    with respect to every example's weight ε_m (Eq 13) in `runs` trajectories at once.

    Returns the data, run 0's checkpoints and learning rates, and the Monte-Carlo mean of dθ_T/dε [d+1, N].
    """
    g = torch.Generator().manual_seed(seed)
    n, d, batch, epochs = 64, 6, 8, 3
    x = torch.cat([torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, -1.5, d, dtype=DT),
                   torch.ones(n, 1, dtype=DT)], 1)  # ill-conditioned: training stops far from the optimum
    y = x @ torch.randn(d + 1, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    curvature = x.T @ x / n
    eta = 0.5 * (1 - momentum) / float(torch.linalg.eigvalsh(curvature).max())
    theta = (2 * torch.randn(d + 1, generator=g, dtype=DT)).expand(runs, -1).clone()
    velocity = torch.zeros_like(theta)
    dtheta = torch.zeros(runs, d + 1, n, dtype=DT)
    dvelocity = torch.zeros_like(dtheta)
    steps_per_epoch = n // batch
    checkpoints = [(0, theta[0].clone())]
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for _ in range(runs)])
        for s in range(steps_per_epoch):
            idx = order[:, s * batch : (s + 1) * batch]
            xb = x[idx]
            grads = xb * ((xb @ theta[:, :, None]).squeeze(-1) - y[idx])[..., None]  # [R, B, d+1]
            hess = xb.transpose(1, 2) @ xb / batch
            picked = torch.zeros(runs, batch, n, dtype=DT).scatter_(2, idx[..., None], 1.0)
            # d/dε of the step direction (1/B) Σ (1 − δε) ∇L + wd θ
            dgrad = hess @ dtheta + weight_decay * dtheta - torch.einsum("rbd,rbn->rdn", grads, picked) / batch
            dvelocity = momentum * dvelocity + dgrad
            velocity = momentum * velocity + grads.mean(1) + weight_decay * theta
            dtheta = dtheta - eta * dvelocity
            theta = theta - eta * velocity
            step = epoch * steps_per_epoch + s + 1
            if step % 4 == 0:
                checkpoints.append((step, theta[0].clone()))
    return x, y, curvature, eta, epochs * steps_per_epoch, checkpoints, theta[0], dtheta.mean(0)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.02)])
def test_source_tracks_the_unrolled_sgd_derivative_better_than_if(momentum, weight_decay):
    x, y, curvature, eta, steps, ckpts, theta_T, mc_mean = unrolled_linear_regression(momentum, weight_decay, 2000)
    n = x.shape[0]
    # exact G as an "EK-FAC" with a 1×1 output factor (Gaussian likelihood: S = [1]); Λ = eig(G)
    sigma, basis = torch.linalg.eigh(curvature)
    one = torch.ones(1, 1, dtype=DT)
    exact = EkfacFactors({"w": ModuleFactors(basis, sigma, one, one[0], sigma[None, :].clone())}, n, n, n)
    traj = Trajectory(OptimizerSettings("sgd", momentum, weight_decay), 8, n, [eta] * steps,
                      [CheckpointRecord(s, f"c{s}") for s, _ in ckpts], states=[{"w": t} for _, t in ckpts])

    def per_example_grads(theta):  # {w: [N, 1, d+1]}
        return {"w": (x * (x @ theta - y)[:, None])[:, None, :]}

    unit = {"w": torch.eye(x.shape[1], dtype=DT)[:, None, :]}  # queries = coordinates: predicted dθ_T/dε [d+1, N]

    def source_prediction(segments, variant="exp"):
        w = source_directions(unit, [exact] * len(segments), segments, variant)
        grads = [[per_example_grads(traj.state(i)["w"]) for i in s.checkpoints] for s in segments]
        return source_scores(w, grads) / n

    segments = segment_trajectory(traj, 3)
    predictions = {
        "source": source_prediction(segments),
        "source-damped": source_prediction(segments, "damped"),
        "source-L1": source_prediction(segment_trajectory(traj, 1)),
    }
    for name, lam in (("if-implied-damping", if_damping(segments)), ("if-undamped", 1e-8)):
        w = ekfac_inverse(exact, unit, lam + weight_decay * (name == "if-undamped"))
        predictions[name] = w["w"].flatten(1) @ per_example_grads(theta_T)["w"].flatten(1).T / n
    if momentum:  # the same SOURCE without the terminal-velocity factor η/(1−μ)
        plain = Trajectory(OptimizerSettings("sgd", 0.0, weight_decay), 8, n, traj.learning_rates, traj.checkpoints,
                           states=traj.states)
        predictions["source-no-momentum-scaling"] = source_prediction(segment_trajectory(plain, 3))
    correlations = {k: corr(v, mc_mean) for k, v in predictions.items()}
    print(f"\nmomentum {momentum}, weight decay {weight_decay}: Pearson with the Monte-Carlo mean of dθ_T/dε",
          {k: round(v, 4) for k, v in correlations.items()})
    assert correlations["source"] > 0.94
    assert correlations["source"] > correlations["if-implied-damping"] + 0.05
    assert correlations["source"] > correlations["if-undamped"] + 0.15
    assert correlations["source-damped"] > correlations["if-implied-damping"]
    if momentum:
        assert correlations["source"] > correlations["source-no-momentum-scaling"] + 0.1
