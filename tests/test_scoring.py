"""Inner products and streaming top-k against brute-force references."""

import torch

from distributed_astra.scoring.inner_products import module_scores, sequence_scores
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
