"""Curvature-vector products against a dense G = (1/N) Σ_n J_nᵀ H_n J_n built from explicit Jacobians (seeds §12.8).

The dense Jacobians come from forward-mode AD (torch.func.jacfwd, or one dual-number forward per column), a
different mechanism from GGNProduct's double-VJP; the output Hessian is formed as a dense diag(p) − p pᵀ.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, jacfwd

from distributed_astra.curvature import fit_ekfac
from distributed_astra.errors import DastraError
from distributed_astra.ihvp import products
from distributed_astra.ihvp.products import (
    FisherProduct,
    GGNProduct,
    MicroBatchedProduct,
    vec_axpy,
    vec_dot,
    vec_norm,
    vec_num_queries,
    vec_put,
    vec_take,
    weighted_gradient_sum,
)
from distributed_astra.models.lm import IGNORE_INDEX
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules
from tests.conftest import GPT2_TRACKED, TinyClassifier

# attn.c_proj is square (16 x 16+1): a forgotten Conv1D transpose would go unnoticed on a non-square module only.


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- dense helpers
def flatten(x: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """[Q, D]: modules in `names` order, each [out, in+1] row-major."""
    return torch.cat([x[n].reshape(x[n].shape[0], -1) for n in names], dim=1)


def unflatten(flat: torch.Tensor, tracked) -> dict[str, torch.Tensor]:
    sizes = [t.shape[0] * t.shape[1] for t in tracked.values()]
    return {n: c.reshape(flat.shape[0], *t.shape) for (n, t), c in zip(tracked.items(), flat.split(sizes, dim=1))}


def dense_jacobian(model, tracked, batch, vectorized: bool = True) -> torch.Tensor:
    """d logits / d θ: [B, T, V, D], θ = the tracked [out, in+1] matrices flattened; by forward-mode AD.

    vectorized=True uses torch.func.jacfwd (needs a model without HF's input-grad hook, i.e. not prepared);
    otherwise one dual-number forward per column.
    """
    names = list(tracked)
    shapes = [tracked[n].shape for n in names]
    sizes = [a * b for a, b in shapes]
    theta = torch.cat([tracked[n].weight_matrix().reshape(-1) for n in names])

    def logits_of(th: torch.Tensor) -> torch.Tensor:
        params = {}
        for n, m, s in zip(names, th.split(sizes), shapes):
            for key, t in tracked[n].to_parameter_layout(m.view(s)).items():
                params[f"{n}.{key}"] = t
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        return functional_call(model, params, args=(), kwargs=kwargs).logits

    if vectorized:
        return jacfwd(logits_of)(theta)
    cols = []
    with torch.no_grad():
        for i in range(theta.numel()):
            with forward_ad.dual_level():
                tangent = torch.zeros_like(theta)
                tangent[i] = 1.0
                cols.append(forward_ad.unpack_dual(logits_of(forward_ad.make_dual(theta, tangent))).tangent)
    return torch.stack(cols, dim=-1)


def dense_ggn(model, tracked, batch, vectorized: bool = True) -> torch.Tensor:
    """G = (1/N) Σ_n Σ_t J_{n,t}ᵀ (diag p − p pᵀ) J_{n,t} over labelled positions, N = loss-carrying sequences."""
    jac = dense_jacobian(model, tracked, batch, vectorized)[:, :-1]  # positions that predict a token
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        p = torch.softmax(model(**kwargs).logits[:, :-1].double(), dim=-1)
    w = (batch["labels"][:, 1:] != IGNORE_INDEX).double()
    n = int((w.sum(dim=1) > 0).sum())
    h = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) * w[..., None, None]
    return torch.einsum("btvd,btvw,btwe->de", jac, h, jac) / n


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gpt2_setup(tiny_gpt2_factory, batch_factory):
    """(prepared model, tracked, batch, dense G); the dense G comes from an unprepared copy with equal weights."""
    model = prepare_for_attribution(tiny_gpt2_factory(seed=2))
    reference = tiny_gpt2_factory(seed=2).requires_grad_(False)
    tracked = select_tracked_modules(model, GPT2_TRACKED)
    batch = batch_factory(num_batches=1, batch_size=4, seq_len=12, seed=5, prompt_len=3, empty_row=True)[0]
    g = dense_ggn(reference, select_tracked_modules(reference, GPT2_TRACKED), batch)
    return model, tracked, batch, g


@pytest.fixture(scope="module")
def mlp_setup(classifier_batch_factory):
    inputs = torch.randn(24, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = TinyClassifier(inputs, hidden=6, num_classes=4)
    tracked = select_tracked_modules(model, ["hidden", "head"])
    batch = classifier_batch_factory(24, 1, 24)[0]
    return model, tracked, batch, dense_ggn(model, tracked, batch, vectorized=False)


def random_vectors(tracked, num_queries: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(num_queries, *t.shape, generator=g, dtype=torch.float64) for n, t in tracked.items()}


# ------------------------------------------------------------------------------------------- GGN product
def test_dense_reference_sees_the_conv1d_layout(gpt2_setup):
    model, tracked, _, _ = gpt2_setup
    assert tracked["transformer.h.0.attn.c_proj"].is_conv1d
    assert tracked["transformer.h.0.attn.c_proj"].shape == (16, 17)


@pytest.mark.parametrize("jv_mode", ["vjp", "jvp"])
def test_ggn_product_equals_dense_gpt2(gpt2_setup, jv_mode):
    model, tracked, batch, g = gpt2_setup
    v = random_vectors(tracked, 5, seed=0)
    # a small tangent budget forces query chunks of 2, 2, 1
    product = GGNProduct(model, tracked, jv_mode=jv_mode, max_tangent_elements=2 * 4 * 12 * 64)
    out = product.product(v, batch)
    assert set(out) == set(tracked) and out["transformer.h.0.attn.c_proj"].shape == (5, 16, 17)
    assert rel(flatten(out, list(tracked)), flatten(v, list(tracked)) @ g) <= 1e-10


def test_ggn_product_equals_dense_mlp(mlp_setup):
    model, tracked, batch, g = mlp_setup
    v = random_vectors(tracked, 3, seed=1)
    out = GGNProduct(model, tracked).product(v, batch)
    assert rel(flatten(out, list(tracked)), flatten(v, list(tracked)) @ g) <= 1e-10


def test_dense_ggn_is_symmetric_psd(mlp_setup, gpt2_setup):
    for _, _, _, g in (mlp_setup, gpt2_setup):
        assert rel(g, g.T) < 1e-12
        assert float(torch.linalg.eigvalsh(g).min()) > -1e-10 * float(g.norm())


def test_ggn_product_of_tied_lm_head_is_its_own_use_only(tiny_gpt2_factory, batch_factory):
    """lm_head is tied to wte: its tracked parameters are the output projection's (as the hooks see it), so
    J v = V h_t per position and G v = (1/N) Σ_t H_t (V h_t) h_tᵀ in closed form."""
    model = prepare_for_attribution(tiny_gpt2_factory(seed=2))
    tracked = select_tracked_modules(model, ["lm_head"])
    batch = batch_factory(num_batches=1, batch_size=3, seq_len=10, seed=6, prompt_len=2)[0]
    v = random_vectors(tracked, 2, seed=7)["lm_head"]
    out = GGNProduct(model, tracked).product({"lm_head": v}, batch)["lm_head"]
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        res = model(**kwargs, output_hidden_states=True)
    hidden, p = res.hidden_states[-1][:, :-1], torch.softmax(res.logits[:, :-1], dim=-1)
    w = (batch["labels"][:, 1:] != IGNORE_INDEX).double()
    jv = torch.einsum("qvi,bti->qbtv", v, hidden)
    hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) * w[..., None]
    expected = torch.einsum("qbtv,bti->qvi", hjv, hidden) / int((w.sum(1) > 0).sum())
    assert rel(out, expected) < 1e-12


def test_ggn_product_is_symmetric(gpt2_setup):
    """uᵀ(G v) = vᵀ(G u) from the product alone, per query.

    Relative to ‖u‖‖Gv‖ (Cauchy-Schwarz), the scale of the round-off of both sides, not to |uᵀGv|: for random u, v
    that is ~1/√D of it (0.02-0.04 here) and could be arbitrarily close to 0. Measured ~1e-17.
    """
    model, tracked, batch, _ = gpt2_setup
    product = GGNProduct(model, tracked)
    u, v = random_vectors(tracked, 3, seed=2), random_vectors(tracked, 3, seed=3)
    gv = product.product(v, batch)
    ugv, vgu = vec_dot(u, gv), vec_dot(v, product.product(u, batch))
    assert float(((ugv - vgu).abs() / (vec_norm(u) * vec_norm(gv))).max()) < 1e-12
    assert bool((vec_dot(v, product.product(v, batch)) > 0).all())


def test_ggn_product_float32_model_returns_the_vectors_dtype(tiny_gpt2_factory, batch_factory):
    model = prepare_for_attribution(tiny_gpt2_factory(seed=2, dtype=torch.float32))
    model64 = prepare_for_attribution(tiny_gpt2_factory(seed=2))
    tracked = select_tracked_modules(model, GPT2_TRACKED)
    batch = batch_factory(num_batches=1, batch_size=4, seq_len=12, seed=5)[0]
    v = random_vectors(tracked, 2, seed=4)
    out = GGNProduct(model, tracked).product(v, batch)
    ref = GGNProduct(model64, select_tracked_modules(model64, GPT2_TRACKED)).product(v, batch)
    assert out["transformer.h.1.mlp.c_fc"].dtype == torch.float64
    assert rel(flatten(out, list(tracked)), flatten(ref, list(tracked))) < 1e-4


def test_ggn_scale_matches_ekfac_lambda(mlp_setup, classifier_batch_factory):
    """Λ (per sequence) is the diagonal of G in the EK-FAC eigenbasis: the product is on EK-FAC's scale."""
    model, _, batch, _ = mlp_setup
    tracked = select_tracked_modules(model, ["head"])
    factors = fit_ekfac(model, tracked, lambda: classifier_batch_factory(24, 400, 4800), torch.float64, seed=0)
    f = factors["head"]
    out_dim, in_dim = f.shape
    # the basis directions q_S,b q_A,aᵀ as Q = out*(in+1) queries
    basis = torch.einsum("ob,ia->baoi", f.q_s, f.q_a).reshape(out_dim * in_dim, out_dim, in_dim)
    gq = GGNProduct(model, tracked).product({"head": basis}, batch)
    diag = vec_dot({"head": basis}, gq).reshape(out_dim, in_dim)
    assert rel(f.lambda_, diag) < 0.05


# ------------------------------------------------------------------------------------------- Fisher product
def test_fisher_product_is_an_unbiased_estimate_of_the_ggn_product(gpt2_setup):
    """S independent one-sample Fisher products: their mean m estimates g = G v with E‖m − g‖² = tr Cov / S.

    Tolerances (stated): ‖m − g‖² ≤ 2.5 · tr(Ĉov)/S (the ratio has mean 1; 0.9-1.3 for S = 250-2000 here), and
    ‖m − g‖/‖g‖ ≤ 5/sqrt(S) (ENV.md measured about 2.6/sqrt(S) on another tiny model, 2.9-3.6 here). The same
    statistic exceeds 5 for a 20 % bias (about 8 at S = 2000), so the test has power.
    """
    model, tracked, batch, g = gpt2_setup
    names = list(tracked)
    v = random_vectors(tracked, 2, seed=5)
    expected = flatten(v, names) @ g
    product = FisherProduct(model, tracked, num_samples=1, generator=torch.Generator().manual_seed(0))
    samples = 2000
    draws = torch.stack([flatten(product.product(v, batch), names) for _ in range(samples)])  # [S, Q, D]
    mean = draws.mean(0)
    noise = draws.var(0).sum() / samples  # estimate of E‖m − g‖²
    assert float((mean - expected).pow(2).sum() / noise) <= 2.5
    assert rel(mean, expected) <= 5.0 / math.sqrt(samples)
    assert float((mean - 1.2 * expected).pow(2).sum() / noise) > 5.0
    # num_samples averages inside one call
    averaged = FisherProduct(model, tracked, num_samples=50, generator=torch.Generator().manual_seed(0))
    assert rel(flatten(averaged.product(v, batch), names), draws[:50].mean(0)) < 1e-10


def test_fisher_product_counts_loss_sequences_only(gpt2_setup):
    """N_B excludes the empty row; the un-normalised sum and the count are exposed for all-reduce."""
    model, tracked, batch, _ = gpt2_setup
    v = random_vectors(tracked, 1, seed=6)
    total, count = FisherProduct(model, tracked, generator=torch.Generator().manual_seed(1)).product_sum(v, batch)
    assert count == 3 and batch["input_ids"].shape[0] == 4
    again = FisherProduct(model, tracked, generator=torch.Generator().manual_seed(1)).product(v, batch)
    assert rel(flatten(again, list(tracked)), flatten(total, list(tracked)) / 3) < 1e-14
    ggn_total, ggn_count = GGNProduct(model, tracked).product_sum(v, batch)
    assert ggn_count == 3


@pytest.mark.parametrize("rows", [1, 3])
def test_micro_batched_product_equals_the_whole_minibatch(gpt2_setup, rows):
    """Σ over micro-batches of `rows` sequences = the whole minibatch's product: the GGN against the dense G, the
    Fisher product with 3 label samples bit-for-bit in its label draws (same generator seed, same draw order)."""
    model, tracked, batch, g = gpt2_setup
    names = list(tracked)
    v = random_vectors(tracked, 2, seed=7)
    micro = MicroBatchedProduct(GGNProduct(model, tracked), rows)
    total, count = micro.product_sum(v, batch)
    assert count == 3  # the empty row carries no loss in any micro-batch
    assert rel(flatten(micro.product(v, batch), names), flatten(v, names) @ g) < 1e-10
    whole = FisherProduct(model, tracked, num_samples=3, generator=torch.Generator().manual_seed(4)).product(v, batch)
    split = MicroBatchedProduct(
        FisherProduct(model, tracked, num_samples=1, generator=torch.Generator().manual_seed(4)), rows, label_samples=3
    ).product(v, batch)
    assert rel(flatten(split, names), flatten(whole, names)) < 1e-10
    with pytest.raises(DastraError, match="solver.micro_batch_size must be >= 1"):
        MicroBatchedProduct(GGNProduct(model, tracked), 0)


# ------------------------------------------------------------------------------------------- helpers
def test_vector_helpers():
    x = {"a": torch.arange(6.0).reshape(2, 1, 3), "b": torch.ones(2, 2, 2)}
    y = {"a": torch.ones(2, 1, 3), "b": 2 * torch.ones(2, 2, 2)}
    assert vec_num_queries(x) == 2
    assert torch.equal(vec_dot(x, y), torch.tensor([3.0 + 8.0, 12.0 + 8.0]))
    assert torch.allclose(vec_norm(y), torch.tensor([math.sqrt(3 + 16)] * 2))
    z = vec_axpy(torch.tensor([1.0, -1.0]), x, y)
    assert torch.equal(z["a"][1], 1 - x["a"][1]) and torch.equal(z["b"][0], 3 * torch.ones(2, 2))
    w = vec_take(x, torch.tensor([1]))
    assert w["a"].shape == (1, 1, 3)
    vec_put(x, torch.tensor([0]), w)
    assert torch.equal(x["a"][0], x["a"][1])


@pytest.mark.parametrize("queries", [1, 3], ids=["per-token", "per-sequence"])
def test_weighted_gradient_sum_is_the_explicit_sum_in_both_orders_and_chunks(monkeypatch, queries: int):
    """Σ_n coeff[n, q] Σ_t Ds_{n,t} ā_{n,t}ᵀ against explicit outer products (float64): Q = 1 takes the per-token
    order, Q = 3 the per-sequence gradients; chunks of one or two sequences at a time."""
    g = torch.Generator().manual_seed(3)
    ds = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    abar = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    coeff = torch.randn(5, queries, generator=g, dtype=torch.float64)
    expected = torch.zeros(queries, 6, 3, dtype=torch.float64)
    for n in range(5):
        gradient = sum(torch.outer(ds[n, t], abar[n, t]) for t in range(4))
        for q in range(queries):
            expected[q] += coeff[n, q] * gradient
    per_sequence = 6 * 3 if queries > 1 else queries * 4 * 6  # one sequence's O·I, or its Q·T·O per token
    monkeypatch.setattr(products, "_FISHER_CHUNK_ELEMENTS", 2 * per_sequence)  # 2 sequences per chunk: 3 chunks
    got = weighted_gradient_sum(ds, abar, coeff)
    assert float((got - expected).norm() / expected.norm()) <= 1e-12
