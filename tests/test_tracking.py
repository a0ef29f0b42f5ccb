"""The tracker writes metrics.jsonl and a real offline W&B run (checked on disk by decoding its .wandb protobuf
stream, no mock): stage-scoped keys on their own define_metric axes, one chart per solve instead of per-query
series, stage throughput and memory, the summary; and the same layout from a whole small `dastra run`."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.config import TrackingConfig
from distributed_astra.tracking import SolveLogger, Tracker
from tests.conftest import QUERIES, corpus_rows
from tests.wandb_offline import read_offline_run


def _offline(root: Path):
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return read_offline_run(run_dir)


def test_offline_wandb_run_and_jsonl_hold_the_same_keys(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), {"solver": {"damping": 0.1}}, "fit") as tracker:
        tracker.define_axis("fit", "fit/batch")
        tracker.log({"fit/batch": 0, "fit/loss": 1.5})
        tracker.log({"fit/batch": 1, "fit/loss": 1.25})
        tracker.summary({"recall@10": 0.9})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fit/loss"] for r in records if "fit/loss" in r] == [1.5, 1.25]
    assert {"metrics": "fit/*", "step": "fit/batch"} in [r["axis"] for r in records if "axis" in r]
    assert records[-1]["summary/recall@10"] == 0.9
    run = _offline(tmp_path)
    assert run.series("fit/loss") == [1.5, 1.25]
    assert run.series("fit/batch") == [0, 1]
    assert run.step_metric("fit/loss") == "fit/batch"
    assert run.summary["recall@10"] == 0.9
    assert not any(k.startswith("summary/") for k in run.keys())  # the summary is no history series
    assert run.config["solver"] == {"damping": 0.1}


def test_online_without_api_key_falls_back_to_offline(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with Tracker(tmp_path, TrackingConfig(wandb_mode="online"), {}, "score") as tracker:
        tracker.log({"score/docs": 3})
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_disabled_still_writes_jsonl(tmp_path: Path):
    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), {}, "solve") as tracker:
        tracker.log({"solve/damping": 0.5})
    assert not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["solve/damping"] == 0.5


def test_online_with_a_key_but_no_reachable_server_falls_back_to_offline_at_once(tmp_path: Path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.perf_counter()
    with Tracker(tmp_path, TrackingConfig(wandb_mode="online"), {}, "fit") as tracker:
        tracker.log({"fit/x": 1})
    assert time.perf_counter() - start < 20  # not W&B's 90 s init timeout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_histogram_table_and_artifact_reach_jsonl_and_the_offline_run(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "summary.json").write_text("{}")
    with Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), {}, "run") as tracker:
        tracker.histogram("fit/spectrum/m", [0.5, 1.5, float("nan"), 2.5])
        tracker.table("score/topk", {"query_id": [1, 1], "doc_id": [7, 3], "score": [0.5, 0.25]})
        tracker.artifact("results", "results", [tmp_path / "summary.json", tmp_path / "absent.html"])
        location = tracker.wandb_location
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in records for k, v in r.items()}
    assert merged["fit/spectrum/m/count"] == 3 and merged["fit/spectrum/m/mean"] == 1.5
    assert merged["score/topk/rows"] == 2 and merged["artifact/results"] == [str(tmp_path / "summary.json")]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert merged["wandb_run"] == location == str(run_dir)
    run = read_offline_run(run_dir)
    (hist,) = logged_media(run.history, "fit/spectrum/m")
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 3
    (table,) = logged_media(run.history, "score/topk")
    data = json.loads((run_dir / "files" / table["path"]).read_text())
    assert data["columns"] == ["query_id", "doc_id", "score"] and data["data"] == [[1, 7, 0.5], [1, 3, 0.25]]


def logged_media(history: list[dict], key: str) -> list[dict]:
    """The rows' values of a media key (histogram, table) as dicts: W&B stores them flattened ("key/_type") or as
    one nested value ("key": {"_type": ...}) depending on the run's history writer."""
    found = []
    for row in history:
        if isinstance(row.get(key), dict):
            found.append(row[key])
        elif f"{key}/_type" in row:
            found.append({k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(f"{key}/")})
    return found


def test_stage_meter_logs_seconds_memory_and_throughput(tmp_path: Path):
    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), {}, "run") as tracker:
        with tracker.stage("score/astra") as meter:
            tracker.count(sequences=30, tokens=600)
            tracker.count(sequences=10)
        with pytest.raises(ValueError), tracker.stage("score/failed"):
            raise ValueError("a failed stage logs nothing")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in records for k, v in r.items()}
    assert merged["score/astra/seconds"] == pytest.approx(meter.seconds)
    assert merged["score/astra/sequences_per_s"] == pytest.approx(40 / meter.seconds)
    assert merged["score/astra/tokens_per_s"] == pytest.approx(600 / meter.seconds)
    assert merged["score/astra/peak_rss_mb"] > 10  # this Python process holds torch
    assert not any(k.startswith("score/failed") for k in merged)


def test_solve_logger_one_continuous_axis_quantiles_and_one_chart(tmp_path: Path, monkeypatch):
    """Two chunks of 3 queries: the aggregates go on ONE iteration axis (0..9, no restart), as p10/median/p90 of the
    relative change of h; the per-query trace is a table and one chart, never a key per query."""
    import pyarrow as pa

    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = {k: [] for k in ("query_id", "repeat", "iteration", "objective", "residual", "status")}
    with Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), {}, "solve") as tracker:
        logger = SolveLogger(tracker, "astra")
        for chunk in (["q0", "q1", "q2"], ["q3", "q4", "q5"]):
            on_iteration, on_heldout = logger.chunk(chunk)
            for k in range(5):
                h = torch.tensor([-(k + 1.0) * (i + 1) for i in range(3)], dtype=torch.float64)
                if k == 4:
                    h[2] = math.nan  # a stopped query
                on_heldout(k, h, h.abs()) if k % 2 == 0 else None
                on_iteration(k, h, h.abs(), 0.1)
                for i, q in enumerate(chunk):
                    if h[i] == h[i]:
                        for key, value in zip(rows, (q, 0, k, float(h[i]), abs(float(h[i])), "running")):
                            rows[key].append(value)
        logger.finish(pa.table(rows), pa.table({k: rows[k] for k in list(rows)[:5]}))
    run = _offline(tmp_path)
    steps = [row["solve/astra/iteration"] for row in run.history if "solve/astra/objective_mean" in row]
    assert steps == list(range(10))  # chunk 1 goes on from where chunk 0 ended
    assert run.step_metric("solve/astra/objective_change_median") == "solve/astra/iteration"
    assert run.series("solve/astra/objective_change_median")[:2] == [0.0, -1.0]  # (h_1 - h_0)/|h_0| = -1 for all 3
    assert run.series("solve/astra/running")[4] == 2
    assert run.series("solve/astra/heldout/objective_change_median")[:2] == [0.0, -2.0]
    assert not any("/q" in key.removeprefix("solve/astra/") for key in run.keys())  # no per-query key
    assert {"solve/astra/per_query", "solve/astra/convergence"} <= set(run.charts)
    assert {"solve/astra/trace/_type", "solve/astra/heldout_trace/_type"} <= run.keys()


# ------------------------------------------------------------------------------------- a whole small run
def _run_overrides(root: Path, run: Path) -> list[str]:
    settings = [
        "model.source=tiny", "model.tiny.vocab_size=300", "model.tiny.n_layer=1", "model.tiny.n_head=2",
        "model.tiny.n_embd=16", "model.tiny.train_steps=20", "model.tiny.train_batch_size=8", "source.checkpoints=2",
        "model.tracked_modules=[transformer.h.*.mlp.c_fc,transformer.h.*.mlp.c_proj]",
        f"data.corpus={root / 'corpus.parquet'}", f"data.queries={root / 'queries.parquet'}", "data.max_length=32",
        "factors.batch_size=8", "scoring.batch_size=8", "scoring.top_k=3", "solver.name=astra",
        "solver.baselines=[ekfac]", "solver.iterations=6", "solver.minibatch_size=4", "solver.query_batch_size=2",
        "solver.heldout_every=3", "solver.heldout_batch_size=2", "report.num_queries=2", "tracking.wandb_mode=offline",
        "plan.check=false",
    ]
    return ["--run-dir", str(run), *[a for s in settings for a in ("--set", s)]]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """`dastra run` from scratch (the tiny GPT-2 trained for 20 steps) with ASTRA and its EK-FAC baseline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("tracked")
    pq.write_table(pa.Table.from_pylist(corpus_rows(40)), root / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(QUERIES), root / "queries.parquet")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        result = CliRunner().invoke(app, ["run", *_run_overrides(root, root / "run")], catch_exceptions=False)
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_run_logs_one_chart_per_stage_metric_on_continuous_axes(small_run: Path):
    run = _offline(small_run)
    keys = run.keys()
    # Axes: each stage's keys against its own step metric.
    for key, axis in (("train/loss", "train/step"), ("fit/covariance/rows", "fit/batch"),
                      ("solve/astra/objective_change_median", "solve/astra/iteration"),
                      ("solve/astra/heldout/objective_change_median", "solve/astra/iteration"),
                      ("score/astra/sequences", "score/astra/shard"), ("score/ekfac/sequences", "score/ekfac/shard")):
        assert key in keys and run.step_metric(key) == axis, key
    assert [row["train/step"] for row in run.history if "train/loss" in row] == list(range(20))
    assert len(run.series("train/tokens_per_s")) == 2  # every 10 steps
    # 3 queries in chunks of 2: ASTRA's iteration axis runs 0..11 without restarting.
    steps = [row["solve/astra/iteration"] for row in run.history if "solve/astra/objective_mean" in row]
    assert steps == list(range(12))
    held = [row["solve/astra/iteration"] for row in run.history if "solve/astra/heldout/objective_mean" in row]
    assert held == [0, 3, 6, 6, 9, 12]  # k = 0, 3 and the final x_6 of each chunk
    # One chart per solve, no series per query; no bare `step` key, no shared score/* keys.
    assert not [k for k in keys if "/objective/q" in k or "/residual/q" in k]
    assert "step" not in keys and "score/num_documents" not in keys and "solve/damping" not in keys
    assert {"solve/astra/per_query", "solve/astra/convergence"} <= set(run.charts)
    assert {"solve/astra/trace/_type", "score/astra/topk/_type", "score/ekfac/topk/_type"} <= keys
    # Throughput and memory of every stage, ASTRA and its baseline apart.
    for scope in ("train", "fit", "query", "solve/astra", "score/astra", "solve/ekfac", "score/ekfac", "report"):
        assert f"{scope}/seconds" in keys and f"{scope}/peak_rss_mb" in keys, scope
    for scope in ("fit", "query", "solve/astra", "score/astra", "score/ekfac"):
        assert f"{scope}/tokens_per_s" in keys and f"{scope}/sequences_per_s" in keys, scope
    assert "train/tokens_per_s" in keys and "prepare/seconds" in keys
    # The summary: summary.json's figures, each method under its own keys.
    summary = json.loads((small_run / "summary.json").read_text())
    assert run.summary["recall@10"] == summary["fact_tracing"]["recall@10"]
    assert run.summary["astra/recall@10"] == summary["fact_tracing"]["recall@10"]
    assert run.summary["ekfac/recall@10"] == summary["baselines"]["ekfac"]["fact_tracing"]["recall@10"]
    assert run.summary["astra/heldout_decreased"] == summary["heldout_decreased"]
    assert run.summary["seconds/solve"] == summary["seconds"]["solve"]


def test_a_run_records_the_heldout_evaluation_and_its_cost(small_run: Path):
    import pyarrow.parquet as pq

    summary = json.loads((small_run / "summary.json").read_text())
    held = pq.read_table(small_run / "ihvp" / "astra" / "heldout.parquet").to_pylist()
    assert sorted({r["iteration"] for r in held}) == [0, 3, 6]
    assert len(held) == 3 * 3
    meta = json.loads((small_run / "ihvp" / "astra" / "meta.json").read_text())["heldout"]
    assert meta["every"] == 3 and meta["batch_size"] == 2 and 0 < meta["cost_fraction"] < 1
    for key in ("heldout_objective_first_mean", "heldout_objective_last_mean", "heldout_decreased",
                "heldout_decreased_fraction", "heldout_cost_fraction"):
        assert key in summary, key
    first = {r["query_id"]: r["objective"] for r in held if r["iteration"] == 0}
    assert summary["heldout_objective_first_mean"] == pytest.approx(sum(first.values()) / 3)
    assert "heldout_decreased" not in summary["baselines"]["ekfac"]  # a direct solve has no iterations
