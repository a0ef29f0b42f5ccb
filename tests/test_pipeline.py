"""The pipeline through the real `dastra` CLI on a small saved model: stages, artifacts, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.curvature.factors import load_factors
from distributed_astra.ihvp.ekfac import ekfac_inverse
from distributed_astra.models.tiny import build_tiny_gpt2
from tests.conftest import QUERIES, assert_one_line_error, corpus_rows, workspace_overrides, write_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("pipeline"), corpus_rows(48), QUERIES)


def _args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [
        *workspace_overrides(workspace),
        "data.max_length=32",
        "factors.batch_size=8",
        "scoring.batch_size=8",
        "scoring.top_k=5",
        "solver.iterations=4",
        "solver.minibatch_size=4",
        "tracking.wandb_mode=disabled",
        *extra,
    ]
    return ["--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_stages_one_by_one_then_run_give_the_same_topk(workspace: Path, tmp_path: Path):
    """`dastra run` = fit, query, solve and score of solver.name (astra in tiny.yaml), then each solver.baselines
    entry (ekfac) solved and scored under baselines/<name>/; the same stages run one by one give the same top-k."""
    staged = tmp_path / "staged"
    for stage in ("fit", "query"):
        result = invoke(stage, *_args(workspace, staged))
        assert result.exit_code == 0, result.output
    staged_topk = {}
    for solver in ("ekfac", "astra"):
        for stage in ("solve", "score"):
            result = invoke(stage, "--solver", solver, *_args(workspace, staged))
            assert result.exit_code == 0, result.output
        assert (staged / "ihvp" / solver / "directions.safetensors").is_file()
        staged_topk[solver] = pq.read_table(staged / "topk.parquet").to_pylist()
    assert (staged / "factors" / "meta.json").is_file()

    whole = tmp_path / "whole"
    result = invoke("run", *_args(workspace, whole, "scoring.dense=true"))
    assert result.exit_code == 0, result.output
    assert "astra: mean h" in result.output and "ekfac: fact tracing" in result.output
    topk = pq.read_table(whole / "topk.parquet")
    assert topk.column_names == ["query_id", "rank", "doc_id", "score", "text"]
    assert topk.num_rows == 3 * 5
    for solver, table in (("astra", topk), ("ekfac", pq.read_table(whole / "baselines" / "ekfac" / "topk.parquet"))):
        rows = table.to_pylist()
        assert [r["doc_id"] for r in rows] == [r["doc_id"] for r in staged_topk[solver]]
        assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in staged_topk[solver]], rel=1e-9)
    summary = json.loads((whole / "summary.json").read_text())
    assert set(summary["seconds"]) >= {"prepare", "fit", "query", "solve", "score", "total"}
    assert summary["solver"] == "astra" and summary["fact_tracing"]["num_fact_queries"] == 2
    assert summary["objective_last_mean"] < summary["objective_first_mean"]  # ASTRA lowers h from the EK-FAC start
    assert set(summary["baselines"]) == {"ekfac"}
    assert summary["baselines"]["ekfac"]["fact_tracing"]["num_fact_queries"] == 2
    assert summary["baselines"]["ekfac"]["status"] == {"exact": 3}

    # The streamed top-k is the top of the dense N x Q matrix, and the text matches the corpus.
    dense = pq.read_table(whole / "scores" / "dense.parquet").to_pandas().set_index("doc_id")
    assert len(dense) == 48
    texts = {r["doc_id"]: r["text"] for r in corpus_rows(48)}
    for query_id in range(3):
        expected = dense[f"q{query_id}"].sort_values(ascending=False).head(5)
        rows = [r for r in topk.to_pylist() if r["query_id"] == query_id]
        assert [r["doc_id"] for r in rows] == list(expected.index)
        assert [r["score"] for r in rows] == pytest.approx(list(expected.values), rel=1e-12)
        assert all(r["text"] == texts[r["doc_id"]] for r in rows)


def test_unknown_config_key(workspace: Path, tmp_path: Path):
    assert_one_line_error(invoke("fit", *_args(workspace, tmp_path, "factors.batchsize=3")), "unknown key 'factors.batchsize'")


def test_wrong_type(workspace: Path, tmp_path: Path):
    assert_one_line_error(invoke("fit", *_args(workspace, tmp_path, "factors.batch_size=many")), "factors.batch_size")


def test_missing_model_path(workspace: Path, tmp_path: Path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(invoke("fit", *_args(workspace, tmp_path, f"model.path={missing}")), "model.path", str(missing))


def test_uncached_hub_id_offline_says_to_set_model_path(workspace: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("fit", *_args(workspace, tmp_path, "model.source=hub", "model.hub_id=nobody/not-a-model"))
    assert_one_line_error(result, "nobody/not-a-model", "set model.path")



def test_sequences_longer_than_the_model_context_are_refused(workspace: Path, tmp_path: Path):
    positions = json.loads((workspace / "model" / "config.json").read_text())["n_positions"]
    result = invoke("fit", *_args(workspace, tmp_path, f"data.max_length={positions + 1}"))
    assert_one_line_error(result, f"data.max_length {positions + 1}", f"at most {positions}")
    assert not (tmp_path / "factors").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_artifact(workspace: Path, tmp_path: Path):
    """A real write failure, no mock: `dastra fit` in a child process whose file-size limit (RLIMIT_FSIZE, so writes
    fail with EFBIG as they would with ENOSPC) is below the size of the factors file."""
    limit = 16 * 1024
    child = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from distributed_astra.cli import app; sys.argv[0] = 'dastra'; app()"
    )
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", child, "fit", *_args(workspace, run_dir)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr  # the console writes to stderr
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("error: no room to write") and "free disk space" in last, output
    assert "Traceback" not in output
    assert not (run_dir / "factors").exists() and not list(run_dir.glob(".factors*"))

def test_empty_corpus(workspace: Path, tmp_path: Path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"doc_id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), empty)
    run_dir = tmp_path / "run"
    assert_one_line_error(invoke("fit", *_args(workspace, run_dir, f"data.corpus={empty}")), str(empty), "empty")
    assert not (run_dir / "factors").exists()


def test_factors_from_another_model_are_refused(workspace: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert invoke("fit", *_args(workspace, run_dir)).exit_code == 0
    assert invoke("query", *_args(workspace, run_dir)).exit_code == 0
    other = tmp_path / "other-model"
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    tokenizer.save_pretrained(other)
    build_tiny_gpt2(len(tokenizer), 2, 2, 16, 32, seed=1).save_pretrained(other)
    result = invoke("solve", *_args(workspace, run_dir, f"model.path={other}"))
    assert_one_line_error(result, "fingerprint", "dastra fit")
    assert not (run_dir / "ihvp").exists()


def test_nan_gradient_names_the_module(workspace: Path, tmp_path: Path):
    poisoned = tmp_path / "poisoned"
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(poisoned)
    run_dir = tmp_path / "run"
    result = invoke("query", *_args(workspace, run_dir, f"model.path={poisoned}"))
    assert_one_line_error(result, "module transformer.h.1.mlp.c_fc: its weights hold NaN/Inf")
    assert not (run_dir / "queries").exists()


def test_query_without_completion_tokens(workspace: Path, tmp_path: Path):
    bad = tmp_path / "queries.parquet"
    pq.write_table(pa.Table.from_pylist([{"query_id": 7, "prompt": "alpha", "completion": ""}]), bad)
    run_dir = tmp_path / "run"
    assert_one_line_error(invoke("query", *_args(workspace, run_dir, f"data.queries={bad}")), "query 7", "completion")
    assert not (run_dir / "queries").exists()


def test_solve_before_fit_says_which_stage_to_run(workspace: Path, tmp_path: Path):
    assert_one_line_error(invoke("solve", *_args(workspace, tmp_path / "fresh")), "dastra fit")


@pytest.mark.parametrize("solver", ["sni", "lissa", "astra"])
def test_iterative_solvers_write_directions_and_a_trace(workspace: Path, tmp_path: Path, solver: str):
    run_dir = tmp_path / "run"
    assert invoke("fit", *_args(workspace, run_dir)).exit_code == 0
    assert invoke("query", *_args(workspace, run_dir)).exit_code == 0
    extra = ("solver.iterations=6", "solver.minibatch_size=4", "solver.query_batch_size=2", "solver.lissa_repeats=2")
    result = invoke("solve", "--solver", solver, *_args(workspace, run_dir, *extra))
    assert result.exit_code == 0, result.output
    trace = pq.read_table(run_dir / "ihvp" / solver / "trace.parquet").to_pandas()
    assert set(trace["query_id"].astype(str)) == {"0", "1", "2"}
    assert trace["iteration"].max() >= 5
    meta = json.loads((run_dir / "ihvp" / solver / "meta.json").read_text())
    assert meta["solver"]["name"] == solver and sum(meta["status"].values()) == 3
    result = invoke("score", "--solver", solver, *_args(workspace, run_dir))
    assert result.exit_code == 0, result.output
    assert pq.read_table(run_dir / "topk.parquet").num_rows == 15


def test_query_stage_forwards_micro_batches_of_queries_with_the_same_gradients(workspace: Path, tmp_path: Path):
    """solver.micro_batch_size bounds the query stage's forward batch too: one query at a time gives every query
    the gradients of one batch of all (float32 round-off of the padded batch, rel ≤ 1e-5)."""
    grads = []
    for run_dir, extra in ((tmp_path / "batched", ()), (tmp_path / "one-by-one", ("solver.micro_batch_size=1",))):
        assert invoke("query", *_args(workspace, run_dir, *extra)).exit_code == 0
        grads.append(load_file(str(run_dir / "queries" / "gradients-00000.safetensors")))
    assert grads[0].keys() == grads[1].keys() != set()
    for name, g in grads[0].items():
        assert float((grads[1][name] - g).norm() / g.norm()) <= 1e-5


def test_bfloat16_state_stores_the_rounded_query_gradients_and_solves_from_them(workspace: Path, tmp_path: Path):
    """solver.state_dtype=bfloat16: the query stage keeps exactly the float32 gradients rounded to bfloat16; the
    EK-FAC directions are P(v) of those stored numbers (the preconditioner in float32), within bfloat16's rounding
    of the result (2^-8 relative) of a float64 reference; ASTRA runs on bfloat16 state and scores."""
    full, half = tmp_path / "float32", tmp_path / "bfloat16"
    bf16 = ("solver.state_dtype=bfloat16",)
    assert invoke("fit", *_args(workspace, full)).exit_code == 0
    assert invoke("query", *_args(workspace, full)).exit_code == 0
    shutil.copytree(full / "factors", half / "factors")
    assert invoke("query", *_args(workspace, half, *bf16)).exit_code == 0
    v32, v16 = (load_file(str(d / "queries" / "gradients-00000.safetensors")) for d in (full, half))
    assert v16.keys() == v32.keys() != set()
    for name, g in v32.items():
        assert v16[name].dtype == torch.bfloat16 and torch.equal(v16[name], g.to(torch.bfloat16)), name
    assert invoke("solve", "--solver", "ekfac", *_args(workspace, half, *bf16)).exit_code == 0
    directions = load_file(str(half / "ihvp" / "ekfac" / "directions.safetensors"))
    damping = json.loads((half / "ihvp" / "ekfac" / "meta.json").read_text())["damping"]
    reference = ekfac_inverse(load_factors(half / "factors").to(dtype=torch.float64),
                              {n: v.to(torch.float64) for n, v in v16.items()}, damping)
    for name, want in reference.items():
        got = directions[name].to(torch.float64)
        assert float((got - want).norm() / want.norm()) <= 2.0**-8, name
    extra = ("solver.iterations=4", "solver.query_batch_size=2", *bf16)
    result = invoke("solve", "--solver", "astra", *_args(workspace, half, *extra))
    assert result.exit_code == 0, result.output
    solved = load_file(str(half / "ihvp" / "astra" / "directions.safetensors"))
    assert solved and all(t.dtype == torch.bfloat16 for t in solved.values())
    assert invoke("score", "--solver", "astra", *_args(workspace, half, *extra)).exit_code == 0
    assert pq.read_table(half / "topk.parquet").num_rows == 15
