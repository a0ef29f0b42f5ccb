"""`dastra eval facts`: per-method fact-tracing recall through the pipeline's own stages, on a small saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.data.sequences import load_queries
from distributed_astra.eval.recall import fact_recall
from tests.test_pipeline import _args, workspace  # noqa: F401  (module-scoped fixture: corpus, queries, model)


def test_eval_facts_per_method_reuses_factors_and_matches_the_topk(workspace: Path, tmp_path: Path):  # noqa: F811
    run_dir = tmp_path / "facts"
    args = _args(workspace, run_dir, "eval.solver.iterations=3", "eval.solver.minibatch_size=4",
                 f"eval.results_dir={tmp_path / 'results'}", f"eval.cache_dir={tmp_path / 'cache'}")
    result = CliRunner().invoke(app, ["eval", "facts", "--methods", "graddot,ekfac,astra", *args])
    assert result.exit_code == 0, result.output
    facts = json.loads((tmp_path / "results" / "lds.json").read_text())["facts"]
    assert [r["method"] for r in facts["rows"]] == ["graddot", "ekfac", "astra"]
    assert facts["num_fact_queries"] == 2
    # the last method's top-k is on disk: its recall is fact_recall of that table
    expected = fact_recall(pq.read_table(run_dir / "topk.parquet"), load_queries(workspace / "queries.parquet"))
    assert {k: facts["rows"][-1][k] for k in expected} == expected
    assert "## Fact tracing" in (tmp_path / "results" / "lds.md").read_text()
    fitted = (run_dir / "factors" / "meta.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["eval", "facts", "--methods", "ekfac", *args])
    assert again.exit_code == 0, again.output
    assert (run_dir / "factors" / "meta.json").stat().st_mtime_ns == fitted  # factors reused, not refitted
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("facts/astra/recall@10" in row for row in logged)
