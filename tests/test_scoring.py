"""Inner products and streaming top-k against brute-force references."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distributed_astra.scoring import inner_products
from distributed_astra.scoring.inner_products import module_scores, sequence_scores
from distributed_astra.scoring.low_rank import low_rank
from distributed_astra.scoring.topk import StreamingTopK


def _explicit_scores(ds, a, directions):
    """Materialise each sequence's gradient Σ_t Ds_t a_tᵀ with outer products, then take plain inner products."""
    out = torch.zeros(ds.shape[0], directions.shape[0], dtype=ds.dtype)
    for b in range(ds.shape[0]):
        gradient = sum(torch.outer(ds[b, t], a[b, t]) for t in range(ds.shape[1]))
        for q in range(directions.shape[0]):
            out[b, q] = (gradient * directions[q]).sum()
    return out


def test_both_contraction_orders_equal_the_explicit_gradient_inner_product():
    g = torch.Generator().manual_seed(0)
    for tokens, queries in ((7, 3), (1, 5), (9, 1)):
        ds = torch.randn(4, tokens, 6, generator=g, dtype=torch.float64)
        a = torch.randn(4, tokens, 5, generator=g, dtype=torch.float64)
        directions = torch.randn(queries, 6, 5, generator=g, dtype=torch.float64)
        expected = _explicit_scores(ds, a, directions)
        torch.testing.assert_close(module_scores(ds, a, directions), expected, rtol=1e-12, atol=1e-12)
        materialised = torch.einsum("boi,qoi->bq", torch.einsum("bto,bti->boi", ds, a), directions)
        per_token = torch.einsum("bto,bqto->bq", ds, torch.einsum("qoi,bti->bqto", directions, a))
        torch.testing.assert_close(materialised, per_token, rtol=1e-12, atol=1e-12)


def test_sequence_scores_sum_over_modules():
    g = torch.Generator().manual_seed(1)
    ds = {m: torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for m in "xy"}
    a = {m: torch.randn(3, 4, 2, generator=g, dtype=torch.float64) for m in "xy"}
    d = {m: torch.randn(2, 5, 2, generator=g, dtype=torch.float64) for m in "xy"}
    torch.testing.assert_close(sequence_scores(ds, a, d), module_scores(ds["x"], a["x"], d["x"]) + module_scores(ds["y"], a["y"], d["y"]))


def test_streaming_topk_sums_documents_split_across_batches_and_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    doc_of_sequence = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6])
    scores = torch.randn(len(doc_of_sequence), 3, generator=g, dtype=torch.float64)
    top = StreamingTopK(num_queries=3, k=4, keep_all=True)
    for start, stop in ((0, 1), (1, 4), (4, 5), (5, 9), (9, 12)):
        top.update(doc_of_sequence[start:stop], scores[start:stop])
    best, ids = top.finish()
    per_doc = torch.zeros(7, 3, dtype=torch.float64).index_add_(0, doc_of_sequence, scores)
    expected_scores, expected_ids = torch.topk(per_doc.t(), 4, dim=1)
    torch.testing.assert_close(best, expected_scores)
    assert torch.equal(ids, expected_ids)
    all_ids, all_scores = top.all_scores()
    assert all_ids.tolist() == list(range(7))
    torch.testing.assert_close(all_scores, per_doc)
    assert top.num_documents == 7


def test_topk_with_fewer_documents_than_k():
    top = StreamingTopK(num_queries=2, k=10)
    top.update(torch.tensor([5, 9]), torch.tensor([[1.0, -1.0], [2.0, 3.0]], dtype=torch.float64))
    best, ids = top.finish()
    assert ids.tolist() == [[9, 5], [9, 5]]
    assert best.tolist() == [[2.0, 1.0], [3.0, -1.0]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_low_rank_directions_at_full_rank_give_the_explicit_scores():
    g = torch.Generator().manual_seed(2)
    ds = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)
    a = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    directions = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    factors = low_rank(directions, rank=5, dtype=torch.float64)
    assert factors.u.shape == (3, 6, 5) and factors.v.shape == (3, 5, 5)
    assert _rel(module_scores(ds, a, factors), _explicit_scores(ds, a, directions)) <= 1e-12
    assert low_rank(directions, rank=50, dtype=torch.float64).u.shape[-1] == 5  # capped at min(out, in+1)


def test_truncated_directions_score_as_their_reconstruction_with_the_eckart_young_error():
    """Rank r < min(O, I): the factor path (never forming X) equals the explicit scores of U Vᵀ, and U Vᵀ is the
    best rank-r approximation: its Frobenius error is the norm of the dropped singular values (numpy's SVD)."""
    g = torch.Generator().manual_seed(3)
    ds = torch.randn(5, 4, 8, generator=g, dtype=torch.float64)
    a = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    directions = torch.randn(4, 8, 6, generator=g, dtype=torch.float64)
    for r in (1, 3):
        factors = low_rank(directions, rank=r, dtype=torch.float64)
        reconstruction = factors.dense()
        assert _rel(module_scores(ds, a, factors), _explicit_scores(ds, a, reconstruction)) <= 1e-12
        for q in range(4):
            dropped = np.linalg.svd(directions[q].numpy(), compute_uv=False)[r:]
            error = float((directions[q] - reconstruction[q]).norm())
            assert error == pytest.approx(float(np.sqrt((dropped**2).sum())), rel=1e-10)


def test_bfloat16_storage_rounds_the_directions_only():
    """bfloat16 U, V with products in float64: the scores' relative error is that of the stored numbers (unit
    round-off 2^-8 per factor, two factors per term), not more."""
    g = torch.Generator().manual_seed(4)
    ds = torch.randn(6, 5, 16, generator=g, dtype=torch.float64)
    a = torch.randn(6, 5, 12, generator=g, dtype=torch.float64)
    directions = torch.randn(3, 16, 12, generator=g, dtype=torch.float64)
    exact = module_scores(ds, a, low_rank(directions, rank=12, dtype=torch.float64))
    rounded = low_rank(directions, rank=12, dtype=torch.bfloat16)
    assert rounded.u.dtype == torch.bfloat16 and rounded.nbytes == (3 * 16 * 12 + 3 * 12 * 12) * 2
    error = _rel(module_scores(ds, a, rounded), exact)
    assert 0 < error <= 2 * 2.0**-8
    assert _rel(module_scores(ds, a, directions.to(torch.bfloat16)), exact) <= 2.0**-8  # whole bf16 directions


def test_stored_directions_in_another_dtype_are_cast_a_block_of_queries_at_a_time(monkeypatch):
    """bfloat16 directions of more queries than a cast block are scored block by block: the same scores as casting
    them all at once (so the float32 copy never holds every query)."""
    g = torch.Generator().manual_seed(5)
    ds = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    stored = torch.randn(7, 6, 4, generator=g, dtype=torch.float64).to(torch.bfloat16)
    monkeypatch.setattr(inner_products, "CAST_BLOCK_ELEMENTS", 2 * 6 * 4)  # blocks of 2 queries
    assert _rel(module_scores(ds, a, stored), module_scores(ds, a, stored.to(torch.float64))) <= 1e-12


def test_cast_blocks_form_the_per_sequence_gradients_once(monkeypatch):
    """Blocks of bfloat16 queries share one bmm of the per-sequence gradients: the FLOPs of the materialised path
    stay 2·B·O·I·(T + Q), as with float32 directions, over 10 cast blocks (meta tensors)."""
    batch, tokens, out_dim, in_dim, queries = 4, 64, 512, 129, 100
    monkeypatch.setattr(inner_products, "CAST_BLOCK_ELEMENTS", 10 * out_dim * in_dim)  # blocks of 10 queries
    ds = torch.empty(batch, tokens, out_dim, device="meta")
    a = torch.empty(batch, tokens, in_dim, device="meta")
    expected = 2 * batch * out_dim * in_dim * (tokens + queries)
    for dtype in (torch.float32, torch.bfloat16):
        stored = torch.empty(queries, out_dim, in_dim, device="meta", dtype=dtype)
        with FlopCounterMode(display=False) as flops:
            module_scores(ds, a, stored)
        assert flops.get_total_flops() == expected, dtype
