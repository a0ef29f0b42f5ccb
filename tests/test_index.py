"""Gradient store, faiss index and `dastra index` / `dastra search` through the real CLI on a tiny saved model.

References: the exhaustive exact scores of `dastra score --set scoring.dense=true` (full gradients, no projection),
and brute-force inner products over the stored vectors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.config import IndexConfig, load_config
from distributed_astra.context import open_context
from distributed_astra.index import stages
from distributed_astra.index.calibration import preconditioned_queries
from distributed_astra.index.faiss_index import (
    build_index,
    index_kind,
    load_index,
    save_index,
    search_index,
)
from distributed_astra.index.store import GradientStore, open_store
from distributed_astra.models.tiny import build_tiny_gpt2
from tests.conftest import corpus_rows, workspace_overrides, write_workspace

NUM_DOCS, TOP_K = 60, 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    rows = corpus_rows(NUM_DOCS, first_id=500, min_words=4, max_words=50)
    rows[7]["text"] = ""  # skipped and counted, never stored
    queries = [
        {"query_id": 0, "prompt": "alpha beta", "completion": " gamma delta"},
        {"query_id": 1, "prompt": "river city", "completion": " stone omega"},
        {"query_id": 2, "prompt": "omega", "completion": " sigma kappa lambda"},
    ]
    return write_workspace(tmp_path_factory.mktemp("index"), rows, queries, row_group_size=16)


def _overrides(workspace: Path, *extra: str) -> list[str]:
    return [
        *workspace_overrides(workspace),
        "data.max_length=16",  # documents of up to 50 words span several sequences
        "data.shard_rows=16",
        "factors.batch_size=8",
        "scoring.batch_size=8",
        f"scoring.top_k={TOP_K}",
        "solver.name=ekfac",
        "tracking.wandb_mode=disabled",
        *extra,
    ]


def _args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(run_dir), *[a for o in _overrides(workspace, *extra) for a in ("--set", o)]]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def run(workspace, tmp_path_factory):
    """fit, query, solve (EK-FAC), dense exact scores, then the index at full dimension (identity projection)."""
    run_dir = tmp_path_factory.mktemp("run")
    full = ["projection.out_dim=1000", "projection.in_dim=1000"]
    for stage in ("fit", "query", "solve"):
        result = invoke(stage, *_args(workspace, run_dir))
        assert result.exit_code == 0, result.output
    result = invoke("score", *_args(workspace, run_dir, "scoring.dense=true"))
    assert result.exit_code == 0, result.output
    result = invoke("index", *_args(workspace, run_dir, *full, "index.store_dtype=float32"))
    assert result.exit_code == 0, result.output
    dense = pq.read_table(run_dir / "scores" / "dense.parquet").to_pandas().set_index("doc_id")
    return run_dir, full, dense


@pytest.fixture(scope="module")
def default_run(run, workspace):
    """The same run indexed at the default projection (16 x 16 per module) into a float16 store."""
    run_dir, _, _ = run
    other = run_dir.parent / (run_dir.name + "-default")
    shutil.copytree(run_dir, other)
    result = invoke("index", *_args(workspace, other))
    assert result.exit_code == 0, result.output
    return other


def _exact_topk(dense, query_id: int, k: int) -> list[int]:
    return dense[f"q{query_id}"].sort_values(ascending=False).index[:k].tolist()


def _assert_search_is_exact_topk(run_dir: Path, dense, rel: float) -> list[dict]:
    """search/topk.parquet holds, per query, the exhaustive exact top-k with its exact scores; returns its rows."""
    table = pq.read_table(run_dir / "search" / "topk.parquet").to_pylist()
    for q in range(3):
        got = [r for r in table if r["query_id"] == q]
        assert [r["doc_id"] for r in got] == _exact_topk(dense, q, TOP_K)
        for r in got:
            assert r["score"] == pytest.approx(dense.loc[r["doc_id"], f"q{q}"], rel=rel, abs=1e-6)
    return table


def test_store_layout_metadata_and_zero_copy_fp16(run, default_run):
    run_dir, _, _ = run
    meta = json.loads((run_dir / "store" / "meta.json").read_text())
    assert meta["num_documents"] == NUM_DOCS - 1 and meta["skipped_rows"] == {"empty": 1, "non_utf8": 0}
    assert len(meta["shards"]) == 4  # 60 rows / shard_rows 16
    assert meta["projection_seed"] == 0 and meta["store_dtype"] == "float32"
    assert set(meta["projection_dims"]) == set(meta["tracked_modules"])
    assert not (run_dir / "store" / "progress.json").exists()

    # fp16 store of the default (16 x 16) projection: read back zero-copy, still float16
    expected = {k: v for k, v in json.loads((default_run / "store" / "meta.json").read_text()).items()
                if k in ("fingerprint", "projection_seed")}
    store = open_store(default_run / "store", expected)
    shard = store.read_shard(0)
    assert shard.vectors.dtype == np.float16 and shard.vectors.shape == (15, store.dim)  # row 7 is empty
    assert not shard.vectors.flags.owndata and not shard.vectors.flags.writeable  # a view of the mapped file
    assert shard.rows.tolist() == [r for r in range(16) if r != 7]
    assert shard.doc_ids.tolist() == [500 + r for r in shard.rows]
    assert GradientStore(run_dir / "store", meta).read_shard(0).vectors.dtype == np.float32


def test_full_dimension_store_reproduces_exact_scores(run, workspace):
    """At k ≥ every side the projection is the identity: stored vector · direction = the exact document score."""
    run_dir, full, dense = run
    result = invoke("search", *_args(workspace, run_dir, *full, "index.shortlist_factor=2", "index.rescore=false"))
    assert result.exit_code == 0, result.output
    _assert_search_is_exact_topk(run_dir, dense, rel=1e-4)


def test_two_stage_search_equals_exhaustive_exact_topk(run, default_run, workspace):
    """Default projection, shortlist of the whole corpus: the exact re-score must give the exhaustive top-k exactly."""
    _, _, dense = run
    other = default_run
    result = invoke("search", *_args(workspace, other, f"index.shortlist_factor={NUM_DOCS}"))
    assert result.exit_code == 0, result.output
    for r in _assert_search_is_exact_topk(other, dense, rel=1e-5):
        assert r["text"] and r["row"] == r["doc_id"] - 500
    meta = json.loads((other / "search" / "meta.json").read_text())
    assert meta["recall_estimate"] == 1.0 and meta["index_nprobe"] is None  # flat index


def test_search_reports_its_recall_of_the_exhaustive_exact_topk(run, default_run, workspace):
    """A shortlist of top_k (r = 1) at the default projection misses part of the exact top-k; search/meta.json
    reports the recall estimated from its random sample, which on a store this small (59 documents, below
    index.recall_sample_min) is every document: the estimate is then the true recall against exhaustive exact scoring."""
    _, _, dense = run
    result = invoke("search", *_args(workspace, default_run, "index.shortlist_factor=1"))
    assert result.exit_code == 0, result.output
    table = pq.read_table(default_run / "search" / "topk.parquet").to_pylist()
    meta = json.loads((default_run / "search" / "meta.json").read_text())
    assert meta["recall_sample_documents"] == NUM_DOCS - 1 and meta["recall_estimate_stderr"] == 0.0
    per_query = {}
    for q in range(3):
        got = {r["doc_id"] for r in table if r["query_id"] == q}
        per_query[str(q)] = len(got & set(_exact_topk(dense, q, TOP_K))) / TOP_K
    assert meta["recall_per_query"] == pytest.approx(per_query, abs=1e-12)
    assert meta["recall_estimate"] == pytest.approx(np.mean(list(per_query.values())), abs=1e-12)


def test_search_refuses_a_store_from_another_seed_or_model(run, workspace, tmp_path):
    run_dir, full, _ = run
    result = invoke("search", *_args(workspace, run_dir, *full, "projection.seed=1"))
    assert result.exit_code == 2
    assert "gradient store: field 'projection_seed' is 0 but this run expects 1" in result.output
    result = invoke("search", *_args(workspace, run_dir, "projection.out_dim=8"))
    assert result.exit_code == 2 and "field 'projection_dims'" in result.output
    other_model = tmp_path / "model"
    build_tiny_gpt2(300, 2, 2, 16, 32, seed=1).save_pretrained(other_model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other_model / name).write_bytes((workspace / "model" / name).read_bytes())
    result = invoke("search", *_args(workspace, run_dir, *full, f"model.path={other_model}"))
    assert result.exit_code == 2 and "field 'fingerprint'" in result.output


def test_index_resumes_finished_shards(run, workspace, tmp_path):
    """A crash after some shards: the rerun keeps their files and writes the rest, same result."""
    run_dir, full, _ = run
    store = run_dir / "store"
    meta = json.loads((store / "meta.json").read_text())
    copy = tmp_path / "resume"
    shutil.copytree(run_dir, copy)
    (copy / "store" / "meta.json").unlink()
    (copy / "store" / "shard-00003.arrow").unlink()
    expected = {k: meta[k] for k in ("fingerprint", "tracked_modules", "projection_seed", "projection_dims", "whitening",
                                     "projection_total_dim", "max_length", "long_documents", "add_eos", "shard_plan")}
    (copy / "store" / "progress.json").write_text(json.dumps({"expected": expected, "done": {"0": 16, "1": 16, "2": 16}}))
    kept = (copy / "store" / "shard-00000.arrow").stat().st_mtime_ns
    result = invoke("index", *_args(workspace, copy, *full, "index.store_dtype=float32"))
    assert result.exit_code == 0, result.output
    assert (copy / "store" / "shard-00000.arrow").stat().st_mtime_ns == kept
    for i in range(4):
        name = f"shard-{i:05d}.arrow"
        assert (copy / "store" / name).read_bytes() == (store / name).read_bytes()


def test_ivfpq_refine_returns_exact_inner_products(run):
    """IndexRefine re-ranks with the stored vectors: every returned score is the exact inner product."""
    run_dir, _, _ = run
    store = GradientStore(run_dir / "store", json.loads((run_dir / "store" / "meta.json").read_text()))
    cfg = IndexConfig(kind="ivfpq", nlist=1, pq_m=1, pq_bits=4, refine_factor=50)
    index, info = build_index(store, cfg)
    assert isinstance(index, faiss.IndexRefine) and info["kind"] == "ivfpq"
    vectors = np.concatenate([s.vectors for s in store.iter_shards()]).astype(np.float32)
    queries = np.random.default_rng(0).standard_normal((4, store.dim)).astype(np.float32)
    scores, positions = search_index(index, queries, 5)
    brute = queries @ vectors.T
    np.testing.assert_allclose(scores, np.take_along_axis(brute, positions, 1), rtol=1e-4, atol=1e-4)
    # refine_factor x k ≥ N: the refinement sees every vector, so the result is the exact top-5
    np.testing.assert_array_equal(positions, np.argsort(-brute, axis=1)[:, :5])


class _VectorStore:
    """The part of GradientStore that build_index reads: dim, num_documents and shards of float16 vectors."""

    def __init__(self, vectors: np.ndarray, shards: int = 3) -> None:
        self.vectors, self.dim, self.num_documents, self.shards = vectors, vectors.shape[1], len(vectors), shards

    def iter_shards(self):
        for part in np.array_split(self.vectors, self.shards):
            yield SimpleNamespace(vectors=part.astype(np.float16))


def test_ivfpq_recall_on_vectors_of_heterogeneous_norms():
    """Gradient-like vectors (nearly isotropic directions, norms over two orders of magnitude): at the default
    settings IVF-PQ + refine finds the exact top-10 (recall ≥ 0.95 against IndexFlatIP) and returns exact scores.
    An inner-product k-means quantizer (the former IndexIVFPQ(METRIC_INNER_PRODUCT)) ranks lists by direction only
    and misses the large-norm documents that carry the best scores."""
    vectors, queries = _gradient_like()
    index, info = build_index(_VectorStore(vectors), IndexConfig(kind="ivfpq"))
    assert info["index_format"] == "ivfpq-norm-bands/2" and info["nlist"] > 50
    _check_recall_and_exact_scores(index, vectors, queries)


def test_ivfflat_recall_exact_scores_and_save_load(tmp_path):
    """IVF-Flat over the same norm-banded lists and bound: recall ≥ 0.95 against IndexFlatIP at the default
    probing, scores that are the exact inner products (no PQ, no refinement), and the same results after
    save_index + load_index (which sets nprobe from the config)."""
    vectors, queries = _gradient_like()
    cfg = IndexConfig(kind="ivfflat")
    index, info = build_index(_VectorStore(vectors), cfg)
    assert info["kind"] == "ivfflat" and info["index_format"] == "ivfflat-norm-bands/1" and info["nlist"] > 50
    assert isinstance(index, faiss.IndexIVFFlat) and index.d == vectors.shape[1] + 1
    assert index.nprobe == min(cfg.min_nprobe, info["nlist"])  # a small store: the floor of lists, not 5%
    assert index_kind(cfg.model_copy(update={"kind": "auto"}), cfg.ivf_min_documents) == "ivfflat"
    assert index_kind(cfg.model_copy(update={"kind": "auto"}), cfg.ivf_min_documents - 1) == "flat"
    scores, positions = _check_recall_and_exact_scores(index, vectors, queries)
    save_index(index, tmp_path)
    loaded = load_index(tmp_path, cfg.model_copy(update={"device": "cpu"}))
    assert faiss.extract_index_ivf(loaded).nprobe == index.nprobe
    loaded_scores, loaded_positions = search_index(loaded, queries, 10)
    np.testing.assert_array_equal(loaded_positions, positions)
    np.testing.assert_array_equal(loaded_scores, scores)
    # load_index takes the probing of the config it is given: every list probed finds the exact top-10
    everything = load_index(tmp_path, cfg.model_copy(update={"device": "cpu", "probe_fraction": 1.0}))
    assert faiss.extract_index_ivf(everything).nprobe == info["nlist"]
    _, all_positions = search_index(everything, queries, 10)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    np.testing.assert_array_equal(np.sort(all_positions, 1), np.sort(flat.search(queries, 10)[1], 1))


def _gradient_like(count: int = 4000, dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with nearly isotropic directions and norms over two orders of magnitude (float16-rounded), queries."""
    rng = np.random.default_rng(0)
    scales = np.linspace(1.0, 0.1, dim) ** 2  # anisotropic: some directions shared, most not
    directions = rng.standard_normal((count, dim)) * scales
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = (directions * rng.lognormal(0.0, 0.8, (count, 1))).astype(np.float16).astype(np.float32)
    queries = (rng.standard_normal((40, dim)) * scales).astype(np.float32)
    return vectors, queries


def _check_recall_and_exact_scores(index, vectors, queries) -> tuple[np.ndarray, np.ndarray]:
    """recall@10 ≥ 0.95 against IndexFlatIP, scores equal to the float64 inner products (rtol 1e-5)."""
    scores, positions = search_index(index, queries, 10)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, exact_positions = flat.search(queries, 10)
    recall = np.mean([len(set(p) & set(e)) / 10 for p, e in zip(positions, exact_positions)])
    assert recall >= 0.95, recall
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors[positions].astype(np.float64))
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    return scores, positions


def test_search_refuses_an_index_of_another_projection(run, workspace, tmp_path):
    run_dir, full, _ = run
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    meta_path = copy / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["projection_seed"] = 5
    meta_path.write_text(json.dumps(meta))
    result = invoke("search", *_args(workspace, copy, *full))
    assert result.exit_code == 2 and "faiss index: field 'projection_seed' is 5 but this run expects 0" in result.output


def test_search_with_new_queries_preconditions_them_first(run, workspace, tmp_path):
    """`dastra search --queries FILE` computes and solves the new queries' gradients, then searches."""
    run_dir, full, _ = run
    copy = tmp_path / "newq"
    shutil.copytree(run_dir, copy)
    new = tmp_path / "new_queries.parquet"
    pq.write_table(pa.Table.from_pylist([{"query_id": 42, "prompt": "theta kappa", "completion": " lambda"}]), new)
    result = invoke("search", *_args(workspace, copy, *full, "index.rescore=false"), "--queries", str(new))
    assert result.exit_code == 0, result.output
    table = pq.read_table(copy / "search" / "topk.parquet")
    assert set(table.column("query_id").to_pylist()) == {42} and table.num_rows == TOP_K
    assert json.loads((copy / "queries" / "meta.json").read_text())["queries"] == str(new)


def test_search_refuses_source_directions_and_names_the_command_to_use(run, workspace):
    run_dir, full, _ = run
    result = invoke("search", *_args(workspace, run_dir, *full, "solver.name=source"))
    assert result.exit_code == 2
    assert "solver.name=source" in result.output and "dastra score --method source" in result.output


def test_ivf_index_calibrates_its_probing_on_preconditioned_training_gradients(run, workspace, tmp_path):
    """`dastra index` with an IVF kind: the probing is calibrated on sampled documents' EK-FAC-preconditioned
    gradients (index/calibration.py), recorded in index/meta.json and used by `dastra search`. At full dimension
    the projection is the identity, so those queries x_m = (G + λI)⁻¹ ∇L(z_m) against the stored gradients ∇L(z_j)
    form the matrix ∇L(z_j)ᵀ (G + λI)⁻¹ ∇L(z_m), which must be symmetric."""
    run_dir, full, _ = run
    copy = tmp_path / "ivf"
    shutil.copytree(run_dir, copy)
    result = invoke("index", *_args(workspace, copy, *full, "index.store_dtype=float32", "index.kind=ivfflat"))
    assert result.exit_code == 0, result.output
    meta = json.loads((copy / "index" / "meta.json").read_text())
    assert meta["kind"] == "ivfflat" and meta["calibration"]["queries_kind"] == "ekfac-preconditioned training gradients"
    assert meta["calibration"]["queries"] == NUM_DOCS - 1 and meta["calibration"]["recall_at_k"] >= 0.95
    assert meta["nprobe"] >= meta["calibrated_nprobe"] and meta["calibration"]["damping"] > 0
    result = invoke("search", *_args(workspace, copy, *full, "index.rescore=false"))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "search" / "meta.json").read_text())["index_nprobe"] == meta["nprobe"]

    with open_context(load_config(None, [*_overrides(workspace, *full), f"output.run_dir={copy}"]), "index") as ctx:
        projection = stages.run_projection(ctx)
        store = open_store(stages.store_dir(ctx), stages.expected_meta(ctx, projection))
        rows = stages.store_ids(store)[1][:12].tolist()
        queries, _ = preconditioned_queries(ctx, projection, rows)
    stored = np.concatenate([s.vectors for s in store.iter_shards()])[:12].astype(np.float64)
    cross = stored @ queries.astype(np.float64).T  # [j, m]
    np.testing.assert_allclose(cross, cross.T, rtol=0, atol=1e-4 * np.abs(cross).max())
    assert np.all(np.diag(cross) > 0)  # self-influence gᵀ(G + λI)⁻¹g of a positive-definite inverse
