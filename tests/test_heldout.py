"""The solvers' held-out evaluation (ihvp/solvers.py, `HeldoutEvaluator`): h and the residual of the iterates on
one fixed curvature batch, at k = 0, every `solver.heldout_every` iterations and at the end; it changes nothing in
the solve (same directions, same minibatch trace), with the exact GGN and with the sampled-label Fisher."""

from __future__ import annotations

import pytest
import torch

from distributed_astra.config import SolverConfig
from distributed_astra.ihvp.monitor import HELDOUT_COLUMNS
from distributed_astra.ihvp.products import FisherProduct, GGNProduct, label_generator, vec_axpy, vec_dot, vec_take
from distributed_astra.ihvp.solvers import MinibatchSampler, ekfac_preconditioner, solve
from tests.test_products import random_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def _solve(gpt2, product_kind: str, heldout: bool, **settings):
    model, tracked, batches, factors, lam = gpt2
    cfg = SolverConfig(name="astra", iterations=7, minibatch_size=3, lr=0.5, lr_mode="auto", **settings)
    sampler = MinibatchSampler(batches, cfg.minibatch_size, torch.Generator().manual_seed(cfg.seed))
    product = (
        GGNProduct(model, tracked) if product_kind == "ggn" else FisherProduct(model, tracked, 1, label_generator(model, 0))
    )
    batch = sampler.draw(cfg.heldout_batch_size, torch.Generator().manual_seed(cfg.seed + 1)) if heldout else None
    v = random_vectors(tracked, 3, seed=5)
    seen = []
    result = solve(
        v, ekfac_preconditioner(factors, cfg, lam), product, sampler, cfg, lam, heldout=batch,
        on_heldout=lambda step, h, r: seen.append((step, h.clone(), r.clone())),
    )
    return result, batch, product, v, lam, seen


@pytest.mark.parametrize("product_kind", ["ggn", "fisher"])
def test_heldout_evaluation_leaves_the_solve_unchanged(gpt2, product_kind):
    plain, *_ = _solve(gpt2, product_kind, heldout=False, heldout_every=3)
    measured, *_ = _solve(gpt2, product_kind, heldout=True, heldout_every=3)
    for name in plain.x:
        assert torch.equal(plain.x[name], measured.x[name])
    assert plain.trace.objective == measured.trace.objective and plain.status == measured.status
    assert len(plain.heldout) == 0 and len(measured.heldout) > 0 and measured.heldout_seconds > 0


def test_heldout_rows_are_at_the_start_every_k_and_the_end_and_equal_h_on_the_fixed_batch(gpt2):
    result, batch, product, v, lam, seen = _solve(gpt2, "ggn", heldout=True, heldout_every=3)
    table = result.heldout_table()
    assert tuple(table.column_names) == HELDOUT_COLUMNS
    for q in range(3):
        rows = [i for i, x in enumerate(result.heldout.query) if x == q]
        assert [result.heldout.iteration[i] for i in rows] == [0, 3, 6, 7]  # k = 0, every 3, the final x_7
    assert [step for step, _, _ in seen] == [0, 3, 6, 7]
    # The last row of each query is h of its returned direction on the held-out batch.
    ax = vec_axpy(lam, result.x, product.product(result.x, batch))
    h = 0.5 * vec_dot(result.x, ax) - vec_dot(v, result.x)
    last = {q: result.heldout.objective[i] for i, q in enumerate(result.heldout.query)}
    assert [last[q] for q in range(3)] == pytest.approx(h.tolist(), rel=1e-9)
    # ... and the first that of the EK-FAC start (ASTRA's x_0), measured on the same batch.
    first = {}
    for i, q in enumerate(result.heldout.query):
        first.setdefault(q, result.heldout.objective[i])
    factors = gpt2[3]
    x0 = ekfac_preconditioner(factors, SolverConfig(name="astra"), lam)(v)
    ax0 = vec_axpy(lam, x0, product.product(x0, batch))
    h0 = 0.5 * vec_dot(x0, ax0) - vec_dot(v, x0)
    assert [first[q] for q in range(3)] == pytest.approx(h0.tolist(), rel=1e-9)


def test_heldout_fisher_is_the_same_curvature_at_every_evaluation(gpt2):
    """The Fisher product samples labels; the held-out evaluation re-seeds them, so measuring one x twice agrees."""
    result, batch, product, v, lam, _ = _solve(gpt2, "fisher", heldout=True, heldout_every=100)
    from distributed_astra.ihvp.solvers import HeldoutEvaluator

    evaluator = HeldoutEvaluator(product, batch, lam, 1, 3, ["a", "b", "c"], seed=0)
    index = torch.arange(3)
    evaluator.evaluate(result.x, v, index, 0, 0, 0)
    evaluator.evaluate(vec_take(result.x, index), v, index, 1, 0, 1)
    assert evaluator.trace.objective[:3] == evaluator.trace.objective[3:]


def test_draw_leaves_the_sampler_stream_untouched(batch_factory):
    batches = batch_factory(num_batches=2, batch_size=4, seq_len=8, seed=1)
    a = MinibatchSampler(batches, 3, torch.Generator().manual_seed(0))
    b = MinibatchSampler(batches, 3, torch.Generator().manual_seed(0))
    b.draw(5, torch.Generator().manual_seed(1))
    for _ in range(3):
        assert torch.equal(a.sample()["input_ids"], b.sample()["input_ids"])


def test_heldout_every_zero_or_no_batch_evaluates_nothing(gpt2):
    result, *_ = _solve(gpt2, "ggn", heldout=True, heldout_every=0)
    assert len(result.heldout) == 0 and result.heldout_seconds == 0.0
