"""The `index` and `search` stages (called from pipeline.py with its `Context`).

    index:   corpus --(per token: (P_out Ds)(P_in ā)ᵀ, summed per document)--> store/ --> index/index.faiss
    search:  solved directions X_q (ihvp/<solver>/, EK-FAC or ASTRA) --> P_out X_q P_inᵀ --> faiss top k·r
             --> optional exact re-score of the candidates with full gradients --> search/topk.parquet
             (with the re-score, search/meta.json reports the estimated recall of the exhaustive exact top-k from
             an exact re-score of a random sample of the store in the same pass: index/retrieval.py)

The store and the index record the projection (seed, dims), the model fingerprint and the tracked modules; search
refuses a store or index whose record differs from the current run and names the field.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_astra.artifacts import (
    atomic_path,
    check_meta,
    read_directions,
    read_meta,
    write_json,
)
from distributed_astra.config import SOURCE_SOLVERS
from distributed_astra.context import Context, warn_skipped_rows
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.data.corpus import Corpus
from distributed_astra.data.sequences import iter_document_batches, load_queries
from distributed_astra.errors import DastraError
from distributed_astra.index.calibration import preconditioned_queries
from distributed_astra.index.faiss_index import (
    CALIBRATION_QUERIES,
    INDEX_FORMATS,
    build_index,
    faiss_nprobe,
    index_kind,
    load_index,
    sample_positions,
    save_index,
    search_index,
)
from distributed_astra.index.retrieval import (
    RECALL_SAMPLE_SEED,
    recall_estimate,
    recall_sample_size,
)
from distributed_astra.index.store import (
    GradientStore,
    StoreWriter,
    open_store,
    store_bytes,
    write_store,
)
from distributed_astra.index.whitening import store_projection
from distributed_astra.progress import progress_bar
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.projection import KroneckerProjection


def store_dir(ctx: Context) -> Path:
    return ctx.paths.root / "store"


def index_dir(ctx: Context) -> Path:
    return ctx.paths.root / "index"


def search_dir(ctx: Context) -> Path:
    return ctx.paths.root / "search"


def run_projection(ctx: Context) -> KroneckerProjection:
    """The store's projection, whitened in the EK-FAC eigenbasis when the factors exist (index/whitening.py)."""
    return store_projection(ctx)


def expected_meta(ctx: Context, projection: KroneckerProjection) -> dict[str, Any]:
    """The fields a store or index must share with this run to be searched with its queries."""
    data = ctx.cfg.data
    return {
        **ctx.model_meta(), **projection.describe(),
        "max_length": data.max_length, "long_documents": data.long_documents, "add_eos": data.add_eos,
    }


def index(ctx: Context) -> dict[str, Any]:
    """Write the projected gradient store (resumable, shard by shard) and build the faiss index over it."""
    projection = run_projection(ctx)
    corpus = ctx.open_corpus()
    plan = corpus.shard_plan(ctx.cfg.data.shard_rows)
    writer = StoreWriter(
        ctx.model,
        ctx.tracked,
        ctx.tokenizer,
        corpus,
        plan,
        projection,
        ctx.sequence_format,
        ctx.cfg.scoring.batch_size,
        product_dtype(ctx.model, ctx.stat_dtype),
        ctx.cfg.index.store_dtype,
    )
    start = time.perf_counter()
    with progress_bar("project corpus into the store", corpus.num_rows, "docs") as advance:
        meta = write_store(writer, store_dir(ctx), expected_meta(ctx, projection), lambda shard, _n: advance(shard.num_rows))
    store_seconds = time.perf_counter() - start
    skipped = meta["skipped_rows"]
    if skipped["empty"] or skipped["non_utf8"]:
        warn_skipped_rows(ctx.corpus, skipped["empty"], skipped["non_utf8"])  # the line of every corpus pass
    store = open_store(store_dir(ctx), expected_meta(ctx, projection))
    start = time.perf_counter()
    calibration, calibration_info = None, {}
    if index_kind(ctx.cfg.index, store.num_documents) != "flat":
        positions = sample_positions(store.num_documents, CALIBRATION_QUERIES, seed=0)
        made = preconditioned_queries(ctx, projection, store_ids(store)[1][positions].tolist())
        if made is not None:
            calibration, calibration_info = (positions, made[0]), made[1]
    faiss_index, info = build_index(store, ctx.cfg.index, calibration)
    if calibration_info:
        info["calibration"].update(calibration_info)
    with atomic_path(index_dir(ctx)) as tmp:
        tmp.mkdir()
        save_index(faiss_index, tmp)
        write_json(tmp / "meta.json", {**expected_meta(ctx, projection), "shard_plan": meta["shard_plan"], **info})
    index_seconds = time.perf_counter() - start
    ctx.tracker.log(
        {
            "index/num_documents": store.num_documents,
            "index/dim": store.dim,
            "index/store_bytes": store_bytes(store_dir(ctx)),
            "index/store_seconds": store_seconds,
            "index/build_seconds": index_seconds,
        }
    )
    return {**info, "store_seconds": store_seconds, "index_seconds": index_seconds}


def directions_fresh(ctx: Context) -> bool:
    """Whether ihvp/<solver>/ holds the solved directions of exactly `data.queries` (else `dastra search` computes
    and solves them first, so it works on new queries)."""
    wanted = [q.query_id for q in load_queries(ctx.queries)]
    solver_dir = ctx.paths.ihvp(ctx.cfg.solver.name)
    if not ((solver_dir / "meta.json").is_file() and (ctx.paths.queries / "meta.json").is_file()):
        return False
    recorded = read_meta(ctx.paths.queries, "query gradients", "query").get("queries")
    return recorded == str(ctx.queries) and read_meta(solver_dir, "solved directions", "solve").get("query_ids") == wanted


def exact_document_scores(
    ctx: Context, corpus: Corpus, rows: list[int], directions: dict[str, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """row -> [Q] exact scores Σ_t Ds_tᵀ X_q ā_t over the document's sequences (full gradients, no projection)."""
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    directions = {name: x.to(compute) for name, x in directions.items()}
    documents = corpus.documents_at(rows)
    ordered = [documents[r] for r in sorted(documents)]
    batches = iter_document_batches(ordered, ctx.tokenizer, ctx.sequence_format, ctx.cfg.scoring.batch_size)
    totals: dict[int, torch.Tensor] = {}
    for batch, capture in captured_batches(ctx.model, ctx.tracked, batches, compute):
        scores = sequence_scores(capture.output_grads, capture.activations, directions).double()
        for row, score in zip(batch["row"].tolist(), scores):
            totals[row] = totals.get(row, 0) + score
    return totals


def open_searchable(ctx: Context) -> GradientStore:
    """The store `dastra search` reads, with its index checked against this run (before any query is solved)."""
    if ctx.cfg.solver.name in SOURCE_SOLVERS:
        raise DastraError(
            f"solver.name={ctx.cfg.solver.name}: the index ranks one direction per query at the final weights, SOURCE "
            f"needs one per checkpoint; use `dastra score --method {ctx.cfg.solver.name}` or search with ekfac | astra"
        )
    expected = expected_meta(ctx, run_projection(ctx))
    store = open_store(store_dir(ctx), expected)
    index_meta = read_meta(index_dir(ctx), "faiss index", "index")
    kind = index_meta.get("kind")  # an index of an older layout of its kind (one without index_format) is refused
    layout = {"index_format": INDEX_FORMATS[kind]} if kind in INDEX_FORMATS and kind != "flat" else {}
    check_meta(index_meta, {**expected, "shard_plan": store.meta["shard_plan"], **layout}, "faiss index", "index")
    return store


def search(ctx: Context, store: GradientStore) -> pa.Table:
    """Top-k documents per query from the index: a shortlist of top_k·r, re-scored exactly when index.rescore.
    `store` is `open_searchable`'s; the directions of `data.queries` are solved (pipeline.search)."""
    projection = run_projection(ctx)
    expected = expected_meta(ctx, projection)
    query_ids, directions = read_directions(ctx.paths.ihvp(ctx.cfg.solver.name), ctx.model_meta())
    cfg, k = ctx.cfg.index, ctx.cfg.scoring.top_k
    queries = projection.project_matrices({name: x.float() for name, x in directions.items()}).numpy()
    faiss_index = load_index(index_dir(ctx), cfg)
    start = time.perf_counter()
    projected, positions = search_index(faiss_index, queries, k * cfg.shortlist_factor)
    search_seconds = time.perf_counter() - start
    _, rows = store_ids(store)
    corpus = ctx.open_corpus()
    exact: dict[int, torch.Tensor] = {}
    shortlists = [{int(rows[p]) for p in row if p >= 0} for row in positions]
    sample_size = recall_sample_size(len(rows), cfg.recall_sample_fraction, cfg.recall_sample_min)
    sample = [int(rows[p]) for p in sample_positions(len(rows), sample_size, RECALL_SAMPLE_SEED)]
    if cfg.rescore:  # the shortlists and the recall sample (index/retrieval.py) in one exact pass
        candidates = sorted(set().union(*shortlists, sample))
        with progress_bar("exact re-score of the shortlist and the recall sample", len(candidates), "docs"):
            exact = exact_document_scores(ctx, corpus, candidates, directions)
    records: dict[str, list] = {"query_id": [], "rank": [], "score": [], "projected_score": [], "row": []}
    results = []
    for q, qid in enumerate(query_ids):
        found = [(int(p), float(s)) for p, s in zip(positions[q], projected[q]) if p >= 0]
        if cfg.rescore:
            found.sort(key=lambda item: -float(exact[int(rows[item[0]])][q]))
        results.append([int(rows[p]) for p, _ in found[:k]])
        for rank, (position, projected_score) in enumerate(found[:k], start=1):
            row = int(rows[position])
            records["query_id"].append(qid)
            records["rank"].append(rank)
            records["row"].append(row)
            records["projected_score"].append(projected_score)
            records["score"].append(float(exact[row][q]) if cfg.rescore else projected_score)
    documents = corpus.documents_at(records["row"])
    table = pa.table({
        "query_id": records["query_id"],
        "rank": records["rank"],
        "doc_id": [documents[r].doc_id for r in records["row"]],
        **{column: records[column] for column in ("score", "projected_score", "row")},
        "text": [documents[r].text for r in records["row"]],
    })
    recall: dict[str, object] = {"recall_estimate": None}  # no exact scores without index.rescore
    if cfg.rescore:
        scores = {row: value.numpy() for row, value in exact.items()}
        recall = recall_estimate(query_ids, shortlists, results, scores, sample, len(rows), k)
    out = search_dir(ctx)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        pq.write_table(table, tmp / "topk.parquet")
        write_json(tmp / "meta.json", {**expected, "rescore": cfg.rescore, "shortlist": k * cfg.shortlist_factor,
                                       "index_nprobe": faiss_nprobe(faiss_index), **recall})
    logged = {"search/seconds": search_seconds, "search/num_queries": len(query_ids)}
    if recall["recall_estimate"] is not None:
        logged["search/recall_estimate"] = recall["recall_estimate"]
    ctx.tracker.log(logged)
    return table


def store_ids(store: GradientStore) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids [N], rows [N]) of the stored documents, in the index's order (shard by shard)."""
    shards = list(store.iter_shards())
    return np.concatenate([s.doc_ids for s in shards]), np.concatenate([s.rows for s in shards])

