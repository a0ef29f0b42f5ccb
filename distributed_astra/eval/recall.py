"""Fact-tracing recall: does the planted document of a fact query rank near the top of its attribution?"""

from __future__ import annotations

import pyarrow as pa

from distributed_astra.data.sequences import Query


def fact_recall(topk: pa.Table, queries: list[Query]) -> dict[str, float]:
    """recall@1, recall@10 and the mean reciprocal rank (0 when outside the top-k) over queries with a planted doc."""
    planted = {q.query_id: q.fact_doc_id for q in queries if q.fact_doc_id is not None}
    ranks: dict[int, int] = {}
    for row in topk.select(["query_id", "rank", "doc_id"]).to_pylist():
        if planted.get(row["query_id"]) == row["doc_id"]:
            ranks[row["query_id"]] = row["rank"]
    n = len(planted)
    if n == 0:
        return {"num_fact_queries": 0}
    found = [ranks.get(q) for q in planted]
    return {
        "num_fact_queries": n,
        "recall@1": sum(r == 1 for r in found) / n,
        "recall@10": sum(r is not None and r <= 10 for r in found) / n,
        "mrr": sum(1.0 / r for r in found if r is not None) / n,
    }
