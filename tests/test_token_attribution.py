"""Per-token attribution: the terms of a document add up to its score, checked against the scoring path and against
an explicit per-document parameter gradient from torch.autograd (an independent route: no hooks, no Ds, no ā)."""

from __future__ import annotations

import torch

from distributed_astra.models.lm import forward_logits, summed_token_loss
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.tokens import document_token_scores, pair_token_scores
from distributed_astra.scoring.topk import StreamingTopK

PATTERNS = ["transformer.h.*.mlp.c_fc", "transformer.h.*.attn.c_attn", "transformer.h.1.attn.c_proj"]
# Documents spanning several rows, one of them across the batch boundary (rows 3 of batch 0 and 0 of batch 1).
DOC_OF_ROW = [[10, 10, 11, 12], [12, 13, 13, 13], [14, 15, 15, 16]]


def _batches(batch_factory):
    batches = batch_factory(num_batches=3, batch_size=4, seq_len=12, seed=3)
    for batch, docs in zip(batches, DOC_OF_ROW):
        batch["doc_id"] = torch.tensor(docs)
    return batches


def _directions(tracked, num_queries: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(num_queries, *tm.shape, generator=g, dtype=torch.float64) for name, tm in tracked.items()}


def test_pair_terms_equal_the_brute_force_triple_sum():
    g = torch.Generator().manual_seed(0)
    ds = {m: torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for m in "xy"}
    a = {m: torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for m in "xy"}
    x = {m: torch.randn(2, 4, 6, generator=g, dtype=torch.float64) for m in "xy"}
    rows, queries = torch.tensor([0, 2, 2, 1]), torch.tensor([1, 0, 1, 1])
    terms = pair_token_scores(ds, a, x, rows, queries)
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for p, (b, q) in enumerate(zip(rows.tolist(), queries.tolist())):
        for t in range(5):
            for m in "xy":
                expected[p, t] += sum(
                    ds[m][b, t, o] * x[m][q, o, i] * a[m][b, t, i] for o in range(4) for i in range(6)
                )
    torch.testing.assert_close(terms, expected, rtol=1e-12, atol=1e-12)


def test_document_terms_sum_to_the_scoring_path_and_to_an_autograd_gradient_dot_product(
    tiny_gpt2_factory, batch_factory
):
    model = prepare_for_attribution(tiny_gpt2_factory(seed=4))
    tracked = select_tracked_modules(model, PATTERNS)
    batches = _batches(batch_factory)
    directions = _directions(tracked, num_queries=3)
    wanted = {10: [0, 2], 12: [1], 13: [0, 1, 2], 16: [2]}

    pairs = document_token_scores(model, tracked, batches, directions, wanted, torch.float64)
    assert set(pairs) == {(q, d) for d, qs in wanted.items() for q in qs}

    # The existing scoring path: hook inner products per sequence, summed per document by the streaming top-k.
    top = StreamingTopK(num_queries=3, k=7, keep_all=True)
    for batch, capture in captured_batches(model, tracked, batches, torch.float64):
        top.update(batch["doc_id"], sequence_scores(capture.output_grads, capture.activations, directions))
    top.finish()
    doc_ids, doc_scores = top.all_scores()
    scored = {int(d): doc_scores[i] for i, d in enumerate(doc_ids)}

    # Independent: a fresh copy of the same model with trainable weights; ∇θ of the document's summed loss by
    # torch.autograd, dotted with the directions mapped to each parameter's own layout by hand.
    reference = tiny_gpt2_factory(seed=4)
    modules = dict(reference.named_modules())
    for (query, doc_id), entry in pairs.items():
        rows = [(b, r) for b, docs in enumerate(DOC_OF_ROW) for r, d in enumerate(docs) if d == doc_id]
        loss = sum(
            summed_token_loss(
                forward_logits(reference, {k: v[r : r + 1] for k, v in batches[b].items()}), batches[b]["labels"][r : r + 1]
            ).sum()
            for b, r in rows
        )
        params = [p for name in tracked for p in (modules[name].weight, modules[name].bias) if p is not None]
        grads = iter(torch.autograd.grad(loss, params))
        explicit = torch.zeros((), dtype=torch.float64)
        for name, tm in tracked.items():
            x = directions[name][query]
            weight_grad = next(grads)
            weight_direction = x[:, : tm.in_features].t() if tm.is_conv1d else x[:, : tm.in_features]
            explicit += (weight_grad * weight_direction).sum()
            if tm.has_bias:
                explicit += (next(grads) * x[:, tm.in_features]).sum()

        terms = entry.terms
        real_tokens = sum(int(batches[b]["attention_mask"][r].sum()) for b, r in rows)
        assert terms.shape == (real_tokens,) and len(entry.token_ids) == real_tokens
        assert entry.token_ids == [t for b, r in rows for t in batches[b]["input_ids"][r][batches[b]["attention_mask"][r].bool()].tolist()]
        torch.testing.assert_close(terms.sum(), scored[doc_id][query], rtol=1e-6, atol=0)
        torch.testing.assert_close(terms.sum(), explicit, rtol=1e-6, atol=0)
        # Not a trivial split: several tokens carry influence, with both signs somewhere in the document.
        assert int((terms.abs() > 1e-3 * terms.abs().max()).sum()) > 1


def test_tokens_of_other_documents_and_padding_carry_no_terms(tiny_gpt2_factory, batch_factory):
    model = prepare_for_attribution(tiny_gpt2_factory(seed=5))
    tracked = select_tracked_modules(model, PATTERNS)
    batches = _batches(batch_factory)
    directions = _directions(tracked, num_queries=1, seed=1)
    pairs = document_token_scores(model, tracked, batches, directions, {15: [0]}, torch.float64)
    (entry,) = pairs.values()
    masks = batches[2]["attention_mask"]
    assert len(entry.token_ids) == int(masks[1].sum() + masks[2].sum())
    assert bool(torch.isfinite(entry.terms).all())
