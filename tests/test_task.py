"""A non-LM model through the core: EK-FAC statistics, the GGN and Fisher products and the query gradients of an
MLP with `task.ClassificationTask` and `task.RegressionTask`, against dense float64 references (seeds §2-3).

The references differentiate a functional MLP of the flattened tracked matrices θ = [vec W̄_0, vec W̄_1] with
torch.func (per-example gradients by vmap(grad), Jacobians by jacfwd), a different mechanism from the package's
module hooks and double-VJP; the output Hessians are formed densely (diag p − p pᵀ, or I).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacfwd, vmap

from distributed_astra.curvature import (
    build_factors,
    collect_covariances,
    collect_eigenvalue_correction,
    eigendecompose,
)
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.products import FisherProduct, GGNProduct
from distributed_astra.models.lm import sample_categorical
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.scoring.gradients import example_gradients
from distributed_astra.task import ClassificationTask, RegressionTask, negative_margin
from tests.conftest import assert_close_rel

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
N, IN, HIDDEN = 24, 4, 5
DOCS = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def mlp(out_dim: int) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, out_dim)).to(F64).eval()
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # spread-out softmax probabilities
    return model


def data(out_dim: int, classification: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(N, IN, dtype=F64, generator=generator)
    if classification:
        return x, torch.randint(0, out_dim, (N,), generator=generator)
    return x, torch.randn(N, dtype=F64, generator=generator)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 10) -> list[dict[str, torch.Tensor]]:
    return [{"inputs": xi, "targets": yi} for xi, yi in zip(x.split(size), y.split(size))]


# ------------------------------------------------------------------------------------------- dense reference
def theta_of(tracked) -> torch.Tensor:
    return torch.cat([tm.weight_matrix().reshape(-1) for tm in tracked.values()])


def split(theta: torch.Tensor, tracked) -> list[torch.Tensor]:
    sizes = [tm.shape[0] * tm.shape[1] for tm in tracked.values()]
    return [part.view(tm.shape) for part, tm in zip(theta.split(sizes), tracked.values())]


def net(theta: torch.Tensor, tracked, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of Linear-tanh-Linear with W̄ = [W b] from θ, and ā of each layer ([.., in+1])."""
    w0, w1 = split(theta, tracked)
    a0 = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    a1 = torch.cat([torch.tanh(a0 @ w0.T), torch.ones_like(x[..., :1])], -1)
    return a1 @ w1.T, [a0, a1]


def per_example_grads(theta, tracked, x, targets, loss) -> torch.Tensor:
    """[N, D]: ∇θ loss(z_n, t_n) of every example."""
    one = lambda th, xi, ti: loss(net(th, tracked, xi[None])[0], ti[None])[0]
    return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, targets)


def dense_ggn(theta, tracked, x, classification: bool) -> torch.Tensor:
    """G = (1/N) Σ_n J_nᵀ H_n J_n [D, D] with J_n = ∂z_n/∂θ by forward-mode AD."""
    jac = jacfwd(lambda th: net(th, tracked, x)[0])(theta)  # [N, C, D]
    z = net(theta, tracked, x)[0]
    if classification:
        p = torch.softmax(z, -1)
        hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        hessian = torch.eye(z.shape[1], dtype=F64).expand(len(x), -1, -1)
    return torch.einsum("ncd,nce,nef->df", jac, hessian, jac) / len(x)


def module_blocks(flat: torch.Tensor, tracked) -> dict[str, torch.Tensor]:
    """[.., D] -> {module: [.., out, in+1]} (row-major blocks in tracked order)."""
    sizes = [tm.shape[0] * tm.shape[1] for tm in tracked.values()]
    parts = flat.split(sizes, dim=-1)
    return {n: p.reshape(*flat.shape[:-1], *tm.shape) for (n, tm), p in zip(tracked.items(), parts)}


def flat(vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in vectors.values()], 1)


def random_vectors(tracked, q: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {n: torch.randn(q, *tm.shape, dtype=F64, generator=generator) for n, tm in tracked.items()}


CASES = {
    "classification": (ClassificationTask(), 3, True),
    "regression": (RegressionTask(), 1, False),
}


def setup(case: str):
    task, out_dim, classification = CASES[case]
    model = mlp(out_dim)
    tracked = select_tracked_modules(model, ["0", "2"])
    x, y = data(out_dim, classification)
    return task, model, tracked, x, y, classification


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("jv_mode", ["vjp", "jvp"])
def test_ggn_product_of_an_mlp_matches_the_dense_ggn(case, jv_mode):
    task, model, tracked, x, y, classification = setup(case)
    g = dense_ggn(theta_of(tracked), tracked, x, classification)
    v = random_vectors(tracked)
    product = GGNProduct(model, tracked, jv_mode, task=task)
    total, count = product.product_sum(v, {"inputs": x, "targets": y})
    assert count == N
    assert_close_rel(flat(total) / count, flat(v) @ g, 1e-11, f"{case} G v ({jv_mode})")


def test_regression_ekfac_and_fisher_are_the_exact_ggn():
    """One output: the sampled targets' gradients are ±J_n, so Λ is diag of G in each Kronecker eigenbasis and the
    Fisher product is G v exactly (seeds §2: F = G; §3 Eq 28)."""
    task, model, tracked, x, y, _ = setup("regression")
    theta = theta_of(tracked)
    g = dense_ggn(theta, tracked, x, classification=False)
    train = batches(x, y)
    generator = torch.Generator().manual_seed(0)
    cov = collect_covariances(model, tracked, train, F64, generator, task=task)
    assert (cov.num_tokens, cov.num_sequences) == (N, N)
    eigens = eigendecompose(cov)
    lam = collect_eigenvalue_correction(model, tracked, eigens, train, F64, generator, task=task)
    factors = build_factors(cov, eigens, lam)

    _, abars = net(theta, tracked, x)
    jac = torch.func.jacrev(lambda th: net(th, tracked, x)[0][:, 0])(theta)  # [N, D] = J_n
    offset = 0
    for (name, tm), abar in zip(tracked.items(), abars):
        size = tm.shape[0] * tm.shape[1]
        assert_close_rel(cov.covariance_a(name), abar.T @ abar / N, 1e-12, f"A {name}")
        ds = jac[:, offset : offset + size].view(N, *tm.shape)[:, :, -1]  # ∂g/∂s_n: the bias column of J_n
        assert_close_rel(cov.covariance_s(name), ds.T @ ds / N, 1e-12, f"S {name}")
        block = g[offset : offset + size, offset : offset + size]
        f = factors[name]
        basis = torch.kron(f.q_s, f.q_a)  # row-major [out, in+1] vectorisation
        assert_close_rel(f.lambda_, torch.diagonal(basis.T @ block @ basis).view(tm.shape), 1e-10, f"Λ {name}")
        offset += size

    v = random_vectors(tracked)
    fisher = FisherProduct(model, tracked, 1, torch.Generator().manual_seed(1), task=task)
    assert_close_rel(flat(fisher.product(v, {"inputs": x, "targets": y})), flat(v) @ g, 1e-11, "F v")


def test_classification_sampled_statistics_match_a_replayed_reference():
    """A, S and Λ from labels drawn from softmax(z): the reference redraws the same labels (same generator, same
    draws per batch and pass) and differentiates them with vmap(grad)."""
    task, model, tracked, x, y, _ = setup("classification")
    theta = theta_of(tracked)
    train = batches(x, y)
    cov = collect_covariances(model, tracked, train, F64, torch.Generator().manual_seed(0), task=task)
    eigens = eigendecompose(cov)
    lam = collect_eigenvalue_correction(model, tracked, eigens, train, F64, torch.Generator().manual_seed(1), task=task)

    def sampled_grads(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.cat([sample_categorical(net(theta, tracked, b["inputs"])[0], generator) for b in train])
        ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
        return module_blocks(per_example_grads(theta, tracked, x, labels, ce), tracked)

    _, abars = net(theta, tracked, x)
    first, second = sampled_grads(0), sampled_grads(1)
    for (name, tm), abar in zip(tracked.items(), abars):
        assert_close_rel(cov.covariance_a(name), abar.T @ abar / N, 1e-12, f"A {name}")
        ds = first[name][:, :, -1]
        assert_close_rel(cov.covariance_s(name), ds.T @ ds / N, 1e-12, f"S {name}")
        rotated = eigens[name].q_s.T @ second[name] @ eigens[name].q_a
        assert_close_rel(lam.corrected_eigenvalues(name), rotated.square().mean(0), 1e-12, f"Λ {name}")

    # the Fisher product with the same labels: (1/N) Σ_n DW̄_n ⟨DW̄_n, v⟩
    v = random_vectors(tracked)
    fisher = FisherProduct(model, tracked, 1, torch.Generator().manual_seed(0), task=task)
    full = {"inputs": x, "targets": y}
    generator = torch.Generator().manual_seed(0)
    labels = sample_categorical(net(theta, tracked, x)[0], generator)
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")
    dw = per_example_grads(theta, tracked, x, labels, ce)
    assert_close_rel(flat(fisher.product(v, full)), (flat(v) @ dw.T) @ dw / N, 1e-11, "F v")


def test_fisher_of_the_classification_task_is_the_ggn_in_expectation():
    """E over sampled labels of the Fisher product is G v (seeds §2): the mean of many draws approaches it."""
    task, model, tracked, x, y, _ = setup("classification")
    g = dense_ggn(theta_of(tracked), tracked, x, classification=True)
    v = random_vectors(tracked, q=1)
    fisher = FisherProduct(model, tracked, 4000, torch.Generator().manual_seed(2), task=task)
    estimate = flat(fisher.product(v, {"inputs": x, "targets": y}))
    expected = flat(v) @ g
    assert float((estimate - expected).norm() / expected.norm()) < 0.05


@pytest.mark.parametrize("case", list(CASES))
def test_training_and_query_gradients_are_the_tasks_loss_and_measurement(case):
    task, model, tracked, x, y, classification = setup(case)
    theta = theta_of(tracked)
    if classification:
        loss = lambda z, t: F.cross_entropy(z, t, reduction="none")
        measure = negative_margin
    else:
        loss = lambda z, t: 0.5 * (z[:, 0] - t) ** 2
        measure = loss  # RegressionTask's default measurement is the training loss
    for objective, reference in ((task.loss, loss), (task.measurement, measure)):
        got = example_gradients(model, tracked, batches(x, y), F64, task=task, objective=objective)
        assert_close_rel(flat(got), per_example_grads(theta, tracked, x, y, reference), 1e-12, case)
        # written in place into [N, ...] tensors when N is known; one module kept (a rank's own): its gradients only
        first = next(iter(tracked))
        kept = example_gradients(model, tracked, batches(x, y), F64, task=task, objective=objective, keep=[first],
                                 num_examples=len(x))
        assert list(kept) == [first] and torch.equal(kept[first], got[first])


def test_supervised_batches_need_targets():
    task, model, tracked, x, _, _ = setup("classification")
    with pytest.raises(DastraError, match="no 'targets'"):
        collect_covariances(model, tracked, [{"inputs": x}], F64, task=task)


def test_python_api_example_runs():
    """docs/python-api.md's first example, as written: EK-FAC IF scores of an MLP, and a finite residual."""
    code = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102
    scores = namespace["scores"]
    assert scores.shape == (16, 48) and bool(torch.isfinite(scores).all())
    assert namespace["factors"].num_sequences == 48
