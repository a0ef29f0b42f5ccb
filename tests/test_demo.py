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

    summary = json.loads((run_dir / "summary.json").read_text())
    facts = summary["fact_tracing"]
    assert facts["num_fact_queries"] >= 40
    assert facts["recall@10"] >= 0.8, facts
    assert f"recall@10 = {facts['recall@10']:.2f}" in result.output
    assert set(summary["seconds"]) >= {"prepare", "fit", "query", "solve", "score", "total"}
    assert summary["solver"] == "astra"
    assert summary["objective_last_mean"] < summary["objective_first_mean"]
    baseline = summary["baselines"]["ekfac"]["fact_tracing"]
    assert baseline["recall@10"] >= 0.8, baseline
    assert f"recall@10 = {baseline['recall@10']:.2f}" in result.output
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
    assert wandb_run.series("time/fit")
    assert wandb_run.summary["ekfac/recall@10"] == baseline["recall@10"]
    assert wandb_run.series("solve/astra/objective_mean")
