"""What a new user meets first, through the real `dastra` CLI: string ids kept as given, one set of defaults (the
config classes), `dastra config`, the resolved config in the run directory, and top-k tables readable in a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.config import Config, describe_keys, load_config
from tests.conftest import QUERIES, corpus_rows, workspace_overrides, write_workspace

QUICK = ["data.max_length=32", "factors.batch_size=8", "scoring.batch_size=8", "scoring.top_k=5",
         "solver.iterations=4", "solver.minibatch_size=4", "tracking.wandb_mode=disabled"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def string_workspace(tmp_path_factory) -> Path:
    """A corpus whose doc_id column holds strings, and queries with string query_id and fact_doc_id."""
    rows = [{"doc_id": f"doc/{r['doc_id']}", "text": r["text"]} for r in corpus_rows(40)]
    queries = [
        {**q, "query_id": f"fact_{q['query_id']:02d}",
         "fact_doc_id": None if q["fact_doc_id"] is None else f"doc/{q['fact_doc_id']}"}
        for q in QUERIES
    ]
    return write_workspace(tmp_path_factory.mktemp("string-ids"), rows, queries)


def test_string_ids_go_through_run_index_and_search_unchanged(string_workspace: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *_sets(*workspace_overrides(string_workspace), *QUICK)]
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    query_ids = [f"fact_{q['query_id']:02d}" for q in QUERIES]
    corpus_ids = set(pq.read_table(string_workspace / "corpus.parquet").column("doc_id").to_pylist())
    for path in (run_dir / "topk.parquet", run_dir / "baselines" / "ekfac" / "topk.parquet"):
        topk = pq.read_table(path)
        assert str(topk.schema.field("query_id").type) == "string" == str(topk.schema.field("doc_id").type)
        assert list(dict.fromkeys(topk.column("query_id").to_pylist())) == query_ids
        assert set(topk.column("doc_id").to_pylist()) <= corpus_ids
        texts = dict(zip(*(pq.read_table(string_workspace / "corpus.parquet").column(c).to_pylist()
                           for c in ("doc_id", "text"))))
        assert all(texts[r["doc_id"]] == r["text"] for r in topk.to_pylist())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fact_tracing"]["num_fact_queries"] == 2
    assert summary["baselines"]["ekfac"]["fact_tracing"]["num_fact_queries"] == 2
    tokens = pq.read_table(run_dir / "token_scores.parquet")
    assert set(tokens.column("query_id").to_pylist()) == set(query_ids)
    assert set(tokens.column("doc_id").to_pylist()) <= corpus_ids
    html = (run_dir / "report.html").read_text()
    assert all(q in html for q in query_ids) and "doc/10" in html
    trace = pq.read_table(run_dir / "ihvp" / "astra" / "trace.parquet")
    assert set(trace.column("query_id").to_pylist()) == set(query_ids)

    for stage in ("index", "search"):
        result = invoke(stage, *args)
        assert result.exit_code == 0, result.output
    found = pq.read_table(run_dir / "search" / "topk.parquet")
    assert list(dict.fromkeys(found.column("query_id").to_pylist())) == query_ids
    assert set(found.column("doc_id").to_pylist()) <= corpus_ids
    exact = pq.read_table(run_dir / "topk.parquet").to_pylist()
    searched = found.to_pylist()  # flat index + exact re-score on 40 documents: the exhaustive top-k
    assert [(r["query_id"], r["doc_id"]) for r in searched] == [(r["query_id"], r["doc_id"]) for r in exact]


def test_top_k_tables_keep_their_columns_off_a_terminal(string_workspace: Path, tmp_path: Path):
    """Printed to a pipe (a CI log), the top-k table keeps rank, doc_id, score and text."""
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *_sets(*workspace_overrides(string_workspace), *QUICK, "solver.name=ekfac",
                                              "solver.baselines=[]")]
    for stage in ("fit", "query", "solve"):
        assert invoke(stage, *args).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "distributed_astra", "score", *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stderr.splitlines() if "rank" in line and "doc_id" in line)
    assert "score" in header and "text" in header
    assert "doc/10" in done.stderr and "fact_00" in done.stderr


def test_a_config_of_model_and_data_runs_the_documented_defaults(tmp_path: Path):
    """Only `model` and `data` set: ASTRA (solver.iterations = 300 of the config classes) with its EK-FAC baseline;
    the resolved config lands in the run directory and reads back as the same config."""
    workspace = write_workspace(tmp_path, corpus_rows(24), QUERIES, n_layer=1)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({
        "model": {"source": "path", "path": str(workspace / "model")},
        "data": {"corpus": str(workspace / "corpus.parquet"), "queries": str(workspace / "queries.parquet"),
                 "max_length": 32},
    }))
    run_dir = tmp_path / "run"
    result = invoke("run", "--config", str(mine), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    defaults = Config()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["solver"] == defaults.solver.name == "astra"
    assert list(summary["baselines"]) == defaults.solver.baselines == ["ekfac"]
    trace = pq.read_table(run_dir / "ihvp" / "astra" / "trace.parquet")
    assert max(trace.column("iteration").to_pylist()) == defaults.solver.iterations - 1
    resolved = load_config(run_dir / "config.yaml")
    assert resolved == load_config(mine, [f"output.run_dir={run_dir}"])


def test_every_key_has_a_description_and_dastra_config_lists_it(tmp_path: Path):
    keys = describe_keys()
    assert len(keys) > 100 and [k for k, _, description in keys if not description] == []
    result = invoke("config", "--set", "solver.iterations=7")
    assert result.exit_code == 0, result.output
    listed = yaml.safe_load(result.output)
    for key, default, description in keys:
        section, *path = key.split(".")
        value = listed[section]
        for part in path:
            value = value[part]
        assert description.split()[0] in result.output
    assert listed["solver"]["iterations"] == 7
    line = next(line for line in result.output.splitlines() if line.strip().startswith("iterations: 7"))
    assert "(default: 300)" in line
    # configs/tiny.yaml states only what the demo changes: each of its keys differs from the class default
    tiny = yaml.safe_load((Path(__file__).parent.parent / "distributed_astra" / "configs" / "tiny.yaml").read_text())
    default_dump = Config().model_dump(mode="json")
    for section, values in tiny.items():
        for key, value in values.items():
            assert default_dump[section][key] != value, f"configs/tiny.yaml repeats the default of {section}.{key}"


@pytest.mark.parametrize("case", ["nulls", "floats", "duplicates"])
def test_bad_query_ids_are_one_line_through_the_cli(string_workspace: Path, tmp_path: Path, case: str):
    """A query_id column with nulls, of another type than integers or strings, or with repeated strings: one line
    naming the file and the column, exit code 2, before any work; the fixed file then runs."""
    import pyarrow as pa

    from tests.conftest import assert_one_line_error

    ids = {"nulls": ["a", None, "c"], "floats": [1.0, 2.5, 3.0], "duplicates": ["a", "b", "a"]}[case]
    queries = pq.read_table(string_workspace / "queries.parquet").to_pylist()
    bad = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"query_id": ids, "prompt": [q["prompt"] for q in queries],
                             "completion": [q["completion"] for q in queries]}), bad)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *_sets(*workspace_overrides(string_workspace), *QUICK, f"data.queries={bad}")]
    result = invoke("query", *args)
    assert_one_line_error(result, str(bad), "query_id")
    assert not (run_dir / "queries").exists() and not (run_dir / "factors").exists()
    pq.write_table(pa.table({"query_id": ["x", "y", "z"], "prompt": [q["prompt"] for q in queries],
                             "completion": [q["completion"] for q in queries]}), bad)
    assert invoke("query", *args).exit_code == 0
    assert json.loads((run_dir / "queries" / "meta.json").read_text())["query_ids"] == ["x", "y", "z"]
