"""Recall estimate of a two-stage search (index/retrieval.py) and the build-time IVF calibration (faiss_index.py),
on gradient stores written as Arrow IPC files on disk.

The reference is exhaustive exact scoring: float64 inner products of the full-dimension vectors with the queries;
the store holds their random projections (scoring/projection.py), as `dastra index` stores projected gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from distributed_astra.config import IndexConfig
from distributed_astra.index.faiss_index import (
    calibration_target,
    build_index,
    exact_store_topk,
    load_index,
    sample_positions,
    save_index,
    search_index,
)
from distributed_astra.index.retrieval import recall_estimate
from distributed_astra.index.store import (
    GradientStore,
    _record_batch,
    shard_file,
    store_schema,
)
from distributed_astra.scoring.projection import orthogonal_projection

K = 10


def write_store(folder: Path, vectors: np.ndarray, shards: int = 4) -> GradientStore:
    """A float32 store of `vectors` in `shards` Arrow IPC files (doc_id = 1000 + row), read back through GradientStore."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"dim": vectors.shape[1], "num_documents": len(vectors), "store_dtype": "float32", "shards": []}
    start = 0
    for shard_id, part in enumerate(np.array_split(vectors, shards)):
        rows = np.arange(start, start + len(part), dtype=np.int64)
        with pa.OSFile(str(folder / shard_file(shard_id)), "wb") as sink, \
                pa.ipc.new_file(sink, store_schema(vectors.shape[1], "float32")) as out:
            out.write_batch(_record_batch(rows + 1000, rows, part.astype(np.float32), "float32"))
        meta["shards"].append({"file": shard_file(shard_id), "num_documents": len(part)})
        start += len(part)
    return GradientStore(folder, meta)


def gradient_like(count: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-dimension 'gradients' (anisotropic directions, log-normal norms over two orders of magnitude), queries."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 0.1, dim) ** 2
    vectors = rng.standard_normal((count, dim)) * scales
    vectors *= rng.lognormal(0.0, 0.8, (count, 1)) / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, rng.standard_normal((queries, dim)) * scales


@pytest.mark.parametrize("projected_dim, shortlist_factor", [(32, 2), (128, 10)])
def test_recall_estimate_is_within_a_tenth_of_the_true_recall(tmp_path, projected_dim, shortlist_factor):
    """Two-stage search over a projected store (flat index, shortlist k·r, exact re-score): the estimate from an
    exact re-score of a 5% random sample is within ±0.1 of the recall of the exhaustive exact top-10."""
    full, queries = gradient_like(4000, 512, 40, seed=0)
    projection = orthogonal_projection(projected_dim, full.shape[1], seed=1).numpy().astype(np.float64)
    store = write_store(tmp_path / "store", full @ projection.T)
    index, _ = build_index(store, IndexConfig(kind="flat"))
    _, positions = search_index(index, queries @ projection.T, K * shortlist_factor)
    exact_scores = full @ queries.T  # [N, Q]: exhaustive exact scoring, float64
    exact = dict(enumerate(exact_scores))
    shortlists = [set(row.tolist()) for row in positions]
    results = [sorted(s, key=lambda row: -exact_scores[row, q])[:K] for q, s in enumerate(shortlists)]
    truth = np.argsort(-exact_scores, axis=0)[:K].T
    true_recall = np.mean([len(set(r) & set(t)) / K for r, t in zip(results, truth)])
    assert 0.2 < true_recall < 0.95  # neither trivial end
    sample = sample_positions(len(full), 200, seed=0).tolist()
    report = recall_estimate(list(range(40)), shortlists, results, exact, sample, len(full), K)
    assert abs(report["recall_estimate"] - true_recall) <= 0.1, (report["recall_estimate"], true_recall)
    assert 0 < report["recall_estimate_stderr"] < 0.1 and report["recall_sample_documents"] == 200
    # the whole store sampled: M_q is counted, the estimate is the true recall itself
    everything = recall_estimate(list(range(40)), shortlists, results, exact, list(range(len(full))), len(full), K)
    assert everything["recall_estimate"] == pytest.approx(true_recall, abs=1e-12)
    assert everything["recall_estimate_stderr"] == 0.0


def test_ivf_calibration_reaches_the_target_and_is_what_search_uses(tmp_path):
    """ivfflat with no probing floor: the build picks the fewest lists with leave-one-out recall@10 ≥ the target
    on sampled stored vectors, records the sweep, and load_index probes that many lists again."""
    full, _ = gradient_like(6000, 64, 1, seed=2)
    store = write_store(tmp_path / "store", full)
    cfg = IndexConfig(kind="ivfflat", min_nprobe=1, probe_fraction=1e-6, device="cpu")
    index, info = build_index(store, cfg)
    calibration, target = info["calibration"], calibration_target(cfg.target_recall)
    assert calibration["target_recall"] == pytest.approx(target) and calibration["queries"] == 256
    assert calibration["recall_at_k"] >= target and info["nprobe"] == info["calibrated_nprobe"]
    assert 1 < info["nprobe"] < info["nlist"]  # the target needs some lists, not all of them
    below = [r["recall"] for r in calibration["sweep"] if r["nprobe"] < info["nprobe"]]
    assert below and max(below) < target  # one list fewer misses the target
    # the recorded recall is what the index gives: leave-one-out recall@10 on the same sampled vectors
    own = sample_positions(len(full), 256, seed=0)
    queries = full[own].astype(np.float32)
    exact = exact_store_topk(store, queries, K + 1)
    _, found = search_index(index, queries, K + 1)
    loo = [set([p for p in f if p != me][:K]) & set([p for p in e if p != me][:K]) for f, e, me in zip(found, exact, own)]
    assert np.mean([len(hit) / K for hit in loo]) == pytest.approx(calibration["recall_at_k"], abs=1e-12)
    save_index(index, tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(info))
    assert faiss.extract_index_ivf(load_index(tmp_path, cfg)).nprobe == info["nprobe"]
    assert faiss.extract_index_ivf(load_index(tmp_path, cfg.model_copy(update={"nprobe": 3}))).nprobe == 3
