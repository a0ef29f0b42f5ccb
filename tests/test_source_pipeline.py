"""SOURCE and ASTRA-SOURCE through the pipeline (seeds §6-7, §12.5a, §12.6): the tiny GPT-2's recorded trajectory,
`dastra solve|score|report --method source|astra-source`, and the errors that name a field.

One tiny GPT-2 (float64 attribution, 12 AdamW steps, 6 checkpoints) is trained once for the module; every check
compares the pipeline against another pipeline path that shares none of the SOURCE code (EK-FAC-IF) or against
the trajectory's own numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distributed_astra import context, pipeline
from distributed_astra.cli import app
from distributed_astra.config import load_config
from distributed_astra.source import Trajectory, load_trajectory, save_trajectory
from tests.conftest import QUERIES, assert_one_line_error, corpus_rows

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, CHECKPOINTS = 12, 6


def _overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"output.run_dir={run_dir}",
        "model.source=tiny",
        "model.dtype=float64",
        "model.tiny.vocab_size=300",
        "model.tiny.n_layer=1",
        "model.tiny.n_head=2",
        "model.tiny.n_embd=16",
        f"model.tiny.train_steps={STEPS}",
        "model.tiny.train_batch_size=8",
        f"source.checkpoints={CHECKPOINTS}",
        f"data.corpus={root / 'corpus-*.parquet'}",  # two files: the tiny GPT-2 trains on a glob too
        f"data.queries={root / 'queries.parquet'}",
        "data.max_length=32",
        "factors.batch_size=8",
        "scoring.batch_size=8",
        "scoring.top_k=4",
        "scoring.dense=true",
        "solver.minibatch_size=4",
        "tracking.wandb_mode=disabled",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(workspace, run dir): corpus and queries, the tiny GPT-2 trained with its trajectory, fit and query done."""
    root = tmp_path_factory.mktemp("source-pipeline")
    rows = corpus_rows(20)
    pq.write_table(pa.Table.from_pylist(rows[:10]), root / "corpus-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), root / "corpus-1.parquet")
    pq.write_table(pa.Table.from_pylist(QUERIES), root / "queries.parquet")
    run_dir = root / "run"
    ctx = context.open_context(load_config(None, _overrides(root, run_dir)), "test")
    pipeline.fit(ctx)
    pipeline.query(ctx)
    ctx.tracker.close()
    return root, run_dir


def _dense(root: Path, run_dir: Path, *extra: str) -> tuple[dict, torch.Tensor]:
    """Solve and score with the given overrides; (solve meta, dense scores [N, Q] by doc id)."""
    cfg = load_config(None, _overrides(root, run_dir, *extra))
    ctx = context.open_context(cfg, "test")
    try:
        pipeline.solve(ctx)
        pipeline.score(ctx)
    finally:
        ctx.close()  # the tracker, and the Ray session and worker group of a distributed run
    meta = json.loads((ctx.paths.ihvp(cfg.solver.name) / "meta.json").read_text())
    dense = pq.read_table(run_dir / "scores" / "dense.parquet").sort_by("doc_id").to_pandas()
    return meta, torch.tensor(dense[[f"q{q['query_id']}" for q in QUERIES]].to_numpy())


def test_tiny_training_records_the_trajectory(run):
    _, run_dir = run
    traj = load_trajectory(run_dir / "trajectory")
    assert traj.steps == [2, 4, 6, 8, 10, 12] and traj.num_steps == STEPS
    assert traj.optimizer.name == "adamw" and traj.optimizer.momentum == 0.9
    assert all(c.preconditioner_rms > 0 for c in traj.checkpoints)
    assert all(0 < lr < 3e-3 for lr in traj.learning_rates)  # η × sequences/tokens of the batch (design.md)

    final = load_file(str(run_dir / "model" / "model.safetensors"))
    last = traj.state(-1)
    assert all(torch.equal(final[k], last[k]) for k in final if k in last)  # the last checkpoint is the model


def test_one_segment_damped_source_is_ekfac_if_at_its_damping(run, tmp_path):
    """§12.5a at pipeline level: L = 1 over a single final checkpoint, damped r̃ = (G + λI)⁻¹ with λ = 1/(η_eff K),
    η_eff = η̄ / mean(√v̂ + ε) (AdamW, design.md); it must equal `--solver ekfac` at solver.damping = λ."""
    root, run_dir = run
    traj = load_trajectory(run_dir / "trajectory")
    last = Trajectory(traj.optimizer, traj.batch_size, traj.num_train, traj.learning_rates, traj.checkpoints[-1:],
                      states=[traj.state(-1)])
    save_trajectory(last, tmp_path / "final-only")
    meta, source = _dense(root, run_dir, "solver.name=source", "source.num_segments=1", "source.variant=damped",
                          f"source.trajectory={tmp_path / 'final-only'}")
    mean_lr = sum(traj.learning_rates) / STEPS
    damping = traj.checkpoints[-1].preconditioner_rms / (mean_lr * STEPS)
    assert meta["segments"][0]["damping"] == pytest.approx(damping, rel=1e-12)
    assert meta["damping"] == pytest.approx(damping, rel=1e-12)
    _, ekfac = _dense(root, run_dir, "solver.name=ekfac", f"solver.damping={damping!r}")
    assert source.abs().max() > 0
    torch.testing.assert_close(source, ekfac, rtol=1e-9, atol=1e-12 * float(ekfac.abs().max()))


def test_astra_source_with_zero_iterations_is_damped_source(run):
    """§12.6 at pipeline level: three segments of two checkpoints each (averaged EK-FAC, scores summed over six
    passes); ASTRA-SOURCE started at the EK-FAC solution and stopped at once is damped EK-FAC-SOURCE."""
    root, run_dir = run
    meta, damped = _dense(root, run_dir, "solver.name=source", "source.variant=damped")
    assert [s["steps"] for s in meta["segments"]] == [[0, 4], [4, 8], [8, 12]]
    assert [[c["step"] for c in s["checkpoints"]] for s in meta["segments"]] == [[2, 4], [6, 8], [10, 12]]
    _, astra = _dense(root, run_dir, "solver.name=astra-source", "solver.iterations=0")
    torch.testing.assert_close(astra, damped, rtol=1e-9, atol=1e-12 * float(damped.abs().max()))
    _, exp_form = _dense(root, run_dir, "solver.name=source", "source.variant=exp")
    assert not torch.allclose(exp_form, damped, rtol=1e-6)  # the two r̄ forms differ (both reported, §12.6)


def _cli(root: Path, run_dir: Path, *command: str, extra: tuple[str, ...] = ()):
    args = [a for o in _overrides(root, run_dir, *extra) if not o.startswith("output.") for a in ("--set", o)]
    return CliRunner().invoke(app, [*command, "--run-dir", str(run_dir), *args], catch_exceptions=False)


def test_cli_solve_score_report_with_method_source(run):
    """`dastra solve|score|report --method astra-source` (a few ASTRA iterations): per-segment directions and a
    trace, the top-k, and per-token terms that add up to the multi-checkpoint scores (the report checks this)."""
    root, run_dir = run
    result = _cli(root, run_dir, "solve", "--method", "astra-source", extra=("solver.iterations=3",))
    assert result.exit_code == 0, result.output
    out = run_dir / "ihvp" / "astra-source"
    assert sorted(p.name for p in out.glob("directions_segment*.safetensors")) == [
        f"directions_segment{i}.safetensors" for i in range(3)]
    trace = pq.read_table(out / "trace.parquet").to_pydict()
    assert {q.split("@")[1] for q in trace["query_id"]} == {"segment0", "segment1", "segment2"}
    result = _cli(root, run_dir, "score", "--method", "astra-source")
    assert result.exit_code == 0, result.output
    topk = pq.read_table(run_dir / "topk.parquet")
    assert topk.num_rows == len(QUERIES) * 4
    result = _cli(root, run_dir, "report", "--method", "astra-source")
    assert result.exit_code == 0, result.output
    assert (run_dir / "token_scores.parquet").is_file() and (run_dir / "report.html").is_file()


def test_missing_trajectory_names_the_field(run, tmp_path):
    root, run_dir = run
    model = ("model.source=path", f"model.path={run_dir / 'model'}")
    assert_one_line_error(_cli(root, tmp_path / "a", "solve", "--method", "source", extra=model), "source.trajectory")
    missing = tmp_path / "nowhere"
    assert_one_line_error(_cli(root, run_dir, "solve", "--method", "source", extra=(f"source.trajectory={missing}",)),
                    "source.trajectory", str(missing))


def test_astra_source_on_two_ranks_equals_one_rank(run, tmp_path):
    """The segment fits, the ASTRA-SOURCE directions and the dense scores of 2 Ray ranks (replicated models set to
    each checkpoint's weights, or their segment's mean for G̃) equal one process's, from the same model,
    trajectory and query gradients (SOURCE shares the segment fit and the scoring)."""
    method = "astra-source"
    root, run_dir = run
    dirs = [tmp_path / "one", tmp_path / "two"]
    for d in dirs:  # the model, its trajectory, factors and query gradients; the segment factors are fitted again
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("source", "ihvp", "scores", "topk.parquet"))
    settings = (f"solver.name={method}", "source.num_segments=2", "solver.iterations=6", "solver.baselines=[]")
    one_meta, one = _dense(root, dirs[0], *settings)
    two_meta, two = _dense(root, dirs[1], *settings, "ray.num_workers=2", "ray.num_cpus=2")
    assert [s["damping"] for s in two_meta["segments"]] == [s["damping"] for s in one_meta["segments"]]
    for seg in one_meta["segments"]:
        name = f"directions_segment{seg['index']}.safetensors"
        expected, got = (load_file(str(d / "ihvp" / method / name)) for d in dirs)
        for module, x in expected.items():
            assert float((got[module] - x).norm() / x.norm()) <= 1e-5
    assert float((two - one).abs().max() / one.abs().max()) <= 1e-5
    assert torch.equal(one.argsort(dim=0, descending=True)[:4], two.argsort(dim=0, descending=True)[:4])


def test_source_refuses_zero3(run, tmp_path):
    root, run_dir = run
    result = _cli(root, tmp_path / "b", "solve", "--method", "source",
                  extra=("ray.num_workers=2", "deepspeed.stage=3", "model.dtype=float32"))
    assert_one_line_error(result, "deepspeed.stage", "source")


