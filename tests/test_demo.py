"""`dastra demo` end to end on the embedded default: demo corpus, tiny GPT-2 training, ASTRA-IF with EK-FAC-IF as
its baseline, top-10, report.

This is the acceptance run of the single-process pipeline: the planted fact document of each fact query must be in
the top-10 for at least 80% of the fact queries with either solver, ASTRA must lower the iHVP objective h from its
EK-FAC start, and the run directory must hold the promised artifacts.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distributed_astra.cli import app
from tests.wandb_offline import read_offline_run

pytestmark = pytest.mark.slow


def test_demo_traces_planted_facts(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    check_demo_run(run_dir, result.output)


def check_demo_run(run_dir: Path, output: str) -> None:
    """The demo's acceptance checks on a finished run directory and the command's output."""
    summary = json.loads((run_dir / "summary.json").read_text())
    facts = summary["fact_tracing"]
    assert facts["num_fact_queries"] >= 40
    assert facts["recall@10"] >= 0.8, facts
    assert f"recall@10 = {facts['recall@10']:.2f}" in output
    assert set(summary["seconds"]) >= {"prepare", "fit", "query", "solve", "score", "total"}
    assert summary["solver"] == "astra"
    assert summary["objective_last_mean"] < summary["objective_first_mean"]
    baseline = summary["baselines"]["ekfac"]["fact_tracing"]
    assert baseline["recall@10"] >= 0.8, baseline
    assert f"recall@10 = {baseline['recall@10']:.2f}" in output
    assert (run_dir / "baselines" / "ekfac" / "topk.parquet").is_file() and (run_dir / "report.html").is_file()

    topk = pq.read_table(run_dir / "topk.parquet").to_pylist()
    assert len(topk) == facts["num_fact_queries"] * 10
    assert all(row["text"] for row in topk)
    for query_rows in (topk[i : i + 10] for i in range(0, len(topk), 10)):
        assert [r["rank"] for r in query_rows] == list(range(1, 11))
        assert all(a["score"] >= b["score"] for a, b in zip(query_rows, query_rows[1:]))

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_run = read_offline_run(offline)
    assert wandb_run.summary["recall@10"] == facts["recall@10"]
    assert wandb_run.summary["ekfac/recall@10"] == baseline["recall@10"]
    assert wandb_run.summary["astra/recall@10"] == facts["recall@10"]
    assert wandb_run.series("solve/astra/objective_mean")
    # W&B layout (issue 19): one chart per stage metric on continuous axes, no panel per query.
    keys = wandb_run.keys()
    assert not [k for k in keys if "/objective/q" in k or "/residual/q" in k] and "step" not in keys
    for key, axis in (("train/loss", "train/step"), ("fit/covariance/rows", "fit/batch"),
                      ("solve/astra/objective_change_median", "solve/astra/iteration"),
                      ("solve/astra/heldout/objective_change_median", "solve/astra/iteration"),
                      ("score/astra/sequences", "score/astra/shard"), ("score/ekfac/sequences", "score/ekfac/shard")):
        assert key in keys and wandb_run.step_metric(key) == axis, key
    assert len([r for r in wandb_run.history if "train/loss" in r]) == 1300  # the tiny GPT-2's loss curve
    steps = [r["solve/astra/iteration"] for r in wandb_run.history if "solve/astra/objective_mean" in r]
    assert steps == list(range(len(steps))) and len(steps) == 20 * 5  # 80 queries in 5 chunks, one axis
    assert {"solve/astra/per_query", "solve/astra/convergence"} <= set(wandb_run.charts)
    for scope in ("train", "fit", "query", "solve/astra", "score/astra", "score/ekfac"):
        assert f"{scope}/seconds" in keys and f"{scope}/tokens_per_s" in keys, scope
    # The held-out convergence signal: recorded, cheap, and the report says whether it decreased.
    assert isinstance(summary["heldout_decreased"], bool) and summary["heldout_cost_fraction"] <= 0.15
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert ("did NOT decrease" in report) != summary["heldout_decreased"]
