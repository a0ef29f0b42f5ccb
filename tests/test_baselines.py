"""Attribution methods of the LDS harness against brute-force references: per-example gradients from torch.func
(vmap of grad over the full parameters), dense Gauss-Newton matrices and torch.linalg.solve."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from distributed_astra.config import Config
from distributed_astra.errors import DastraError
from distributed_astra.eval.methods import (
    METHODS,
    Method,
    MethodSettings,
    ModelAttribution,
    get_method,
    register_method,
    trak_projection,
)
from distributed_astra.eval.tasks import build_task
from tests.conftest import assert_close_rel

SMALL = {"num_train": 120, "num_queries": 12, "epochs": 6, "widths": [12]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    task = build_task("digits", tmp_path_factory.mktemp("digits"), SMALL)
    return ModelAttribution(task, task.train(torch.arange(task.num_train), seed=0), seed=0)


def reference_gradients(ctx: ModelAttribution, state: dict, rows: torch.Tensor, fn) -> torch.Tensor:
    """[n, D] per-example gradients of fn(outputs, target) w.r.t. every layer, flattened as [W | b] per module."""
    model = ctx.task.attribution_model(state)
    params = {k: v for k, v in state.items() if k.startswith("layers")}
    x, y = model.inputs[rows], ctx.task.targets[rows]

    def one(p, xi, yi):
        return fn(_net(model, p, xi)[None], yi[None])[0]

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    names = sorted({k.rsplit(".", 1)[0] for k in params}, key=lambda n: int(n.split(".")[1]))
    return torch.cat([torch.cat([grads[f"{n}.weight"], grads[f"{n}.bias"][..., None]], -1).flatten(1) for n in names], 1)


def _net(model, params, x):
    layers = len(model.layers)
    for i in range(layers):
        x = x @ params[f"layers.{i}.weight"].T + params[f"layers.{i}.bias"]
        if i < layers - 1:
            x = torch.relu(x)
    return x


def _settings() -> MethodSettings:
    return MethodSettings(Config(), 1.0)


def test_graddot_and_tracin_match_per_example_autograd(digits):
    task = digits.task
    train, queries = torch.arange(task.num_train), torch.arange(task.num_train, task.num_train + task.num_queries)
    final = digits.trained.checkpoints[-1]
    ref = reference_gradients(digits, final, queries, task.pointwise_measurement) @ \
        reference_gradients(digits, final, train, task.pointwise_loss).T
    # dot products of D-dimensional gradients: round-off scales with max|score| (atol 1e-12 was not scale-aware)
    assert_close_rel(METHODS["graddot"].score(digits, _settings()), ref, 1e-9, "graddot")
    tracin = sum(rate * reference_gradients(digits, s, queries, task.pointwise_measurement)
                 @ reference_gradients(digits, s, train, task.pointwise_loss).T
                 for s, rate in zip(digits.trained.checkpoints, digits.trained.learning_rates))
    assert len(digits.trained.checkpoints) == 4
    assert_close_rel(METHODS["tracin"].score(digits, _settings()), tracin, 1e-9, "tracin")


def test_trak_matches_the_dense_formula(digits):
    task = digits.task
    train, queries = torch.arange(task.num_train), torch.arange(task.num_train, task.num_train + task.num_queries)
    final = digits.trained.checkpoints[-1]
    margin = reference_gradients(digits, final, train, lambda o, t: -task.pointwise_measurement(o, t))
    k = task.num_train // 2  # eval.trak_dim (256) capped at N/2
    p = trak_projection(margin.shape[1], k, 0, margin.dtype)
    phi = margin @ p
    q = reference_gradients(digits, final, queries, task.pointwise_measurement) @ p
    t = reference_gradients(digits, final, train, task.pointwise_loss) @ p
    expected = q @ torch.linalg.inv(phi.T @ phi) @ t.T
    assert_close_rel(METHODS["trak"].score(digits, _settings()), expected, 1e-6, "trak")


def test_ekfac_if_is_the_exact_influence_on_ridge(tmp_path):
    """One linear module with a scalar output: EK-FAC = G = ĀᵀĀ/N exactly, so the scores are ∇fᵀ(G + ρI)⁻¹∇L."""
    task = build_task("ridge", tmp_path)
    ctx = ModelAttribution(task, task.train(torch.arange(task.num_train), seed=0), seed=0)
    abar = torch.cat([task.inputs, torch.ones(len(task.inputs), 1, dtype=torch.float64)], 1)
    theta = torch.cat([ctx.model.layers[0].weight[0], ctx.model.layers[0].bias])
    train, queries = abar[: task.num_train], abar[task.num_train : task.num_train + task.num_queries]
    residual = train @ theta - task.targets[: task.num_train]
    g = train.T @ train / task.num_train
    expected = queries @ torch.linalg.solve(g + task.ridge * torch.eye(g.shape[0], dtype=g.dtype),
                                            (residual[:, None] * train).T)
    assert_close_rel(METHODS["ekfac"].score(ctx, _settings()), expected, 1e-8, "ekfac")


def test_mse_curvature_matches_dense_jacobians(tmp_path):
    task = build_task("diabetes", tmp_path, {"num_train": 60, "num_queries": 4, "epochs": 3, "widths": [6, 5]})
    ctx = ModelAttribution(task, task.train(torch.arange(task.num_train), seed=1), seed=1)
    jac = reference_gradients(ctx, ctx.trained.checkpoints[-1], torch.arange(task.num_train),
                              lambda o, t: o[..., 0])  # J_n = ∇θ g(x_n)
    g = jac.T @ jac / task.num_train
    vectors = {n: torch.randn(3, *t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
               for n, t in ctx.tracked.items()}
    flat = torch.cat([v.flatten(1) for v in vectors.values()], 1)
    batch = ctx.sampler(1).full_batch()
    out = ctx.product().product(vectors, batch)  # GGNProduct with the regression task (H = 1)
    assert_close_rel(torch.cat([v.flatten(1) for v in out.values()], 1), flat @ g, 1e-10, "G v")
    # EK-FAC's Λ is the diagonal of G in each module's Kronecker eigenbasis (seeds §3, Eq 28)
    offset = 0
    for name, tm in ctx.tracked.items():
        size = tm.shape[0] * tm.shape[1]
        block = g[offset : offset + size, offset : offset + size]
        f = ctx.factors[name]
        basis = torch.kron(f.q_s, f.q_a)  # row-major [out, in+1] vectorisation
        # some Λ entries are ~1e-33 of the largest (directions the gradients never take): relative to max Λ
        assert_close_rel(torch.diagonal(basis.T @ block @ basis).view(tm.shape), f.lambda_, 1e-8, name)
        offset += size


def test_method_registry_is_open_and_names_valid_methods():
    with pytest.raises(DastraError, match="valid methods: graddot, tracin, trak, ekfac, sni, astra"):
        get_method("source")
    method = register_method(Method("constant", "constant", lambda ctx, s: torch.zeros(1, 1)))
    try:
        assert get_method("constant") is method
        with pytest.raises(DastraError, match="registered twice"):
            register_method(method)
    finally:
        del METHODS["constant"]
