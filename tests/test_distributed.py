"""Distributed execution on a real local Ray with 2 (and 4) CPU workers, gloo and DeepSpeed ZeRO 0-3, against the
single-process pipeline on the same small saved GPT-2: factors, ASTRA directions and top-k must agree; faults
(a killed scoring actor, a killed driver) must leave the result unchanged; bad input must fail fast and clearly.

One Ray session, and as far as possible one worker group, serve the whole module (the group is reloaded, not
rebuilt, when only deepspeed.stage changes). The order of the tests matters for speed only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distributed_astra import context, pipeline
from distributed_astra.cli import app
from distributed_astra.config import load_config
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import load_factors
from distributed_astra.distributed import cluster, is_distributed, solve_mode
from distributed_astra.distributed.collectives import slice_bounds
from distributed_astra.distributed.deepspeed_config import load_ds_config
from distributed_astra.distributed.executor import RayExecutor
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.monitor import DIVERGED
from distributed_astra.ownership import balance_by_cost, owned, run_owners
from distributed_astra.plan import make_plan
from distributed_astra.scoring.low_rank import stored_direction
from tests.conftest import (
    QUERIES,
    WORDS,
    assert_same_eigendecomposition,
    corpus_rows,
    workspace_overrides,
    write_workspace,
)

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("distributed"), corpus_rows(48), QUERIES, row_group_size=16)


def _overrides(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *workspace_overrides(workspace),
        "data.max_length=32",
        "data.shard_rows=4",
        "factors.batch_size=8",
        "scoring.batch_size=8",
        "scoring.top_k=5",
        "solver.name=astra",
        "solver.iterations=12",
        "solver.minibatch_size=4",
        "solver.query_batch_size=2",
        "solver.lr_decay_every=5",
        "tracking.wandb_mode=disabled",
        f"output.run_dir={run_dir}",
        *extra,
    ]


DISTRIBUTED = ("ray.num_workers=2",)
SHARED: list[RayExecutor] = []  # one executor, and so one worker group, for the module's distributed contexts


def _context(workspace: Path, run_dir: Path, *extra: str) -> context.Context:
    cfg = load_config(None, _overrides(workspace, run_dir, *extra))
    return context.open_context(cfg, "test", executor=SHARED[0] if SHARED and is_distributed(cfg) else None)


def _stages(ctx: context.Context, *names: str):
    try:
        return [getattr(pipeline, name)(ctx) for name in names]
    finally:
        ctx.tracker.close()


@pytest.fixture(scope="module")
def single(workspace: Path, tmp_path_factory, one_thread) -> Path:
    """The single-process reference: factors, query gradients, ASTRA (exact GGN product), top-k."""
    run_dir = tmp_path_factory.mktemp("single")
    _stages(_context(workspace, run_dir), "fit", "query", "solve", "score")
    return run_dir


@pytest.fixture(scope="module")
def single_fisher(workspace: Path, single: Path, tmp_path_factory) -> Path:
    """The single-process ASTRA with the sampled-label Fisher product (2 label samples), from the same factors."""
    run_dir = tmp_path_factory.mktemp("single-fisher")
    for name in ("factors", "queries", "model"):
        if (single / name).exists():
            shutil.copytree(single / name, run_dir / name)
    _stages(_context(workspace, run_dir, "solver.product=fisher", "solver.fisher_samples=2"), "solve")
    return run_dir


@pytest.fixture(scope="module")
def ray_session(workspace: Path):
    cluster.connect(load_config(None, ["ray.num_cpus=4", "ray.object_store_mb=128"]).ray)  # 4 ranks at most
    SHARED.append(RayExecutor(str(workspace / "model")))
    yield ray.get_runtime_context().gcs_address
    SHARED.pop().close()
    cluster.shutdown()


# ------------------------------------------------------------------------------------------ bad input, no cluster
def test_unreachable_address_fails_within_30_seconds(workspace: Path, tmp_path: Path):
    assert not ray.is_initialized()
    cfg = load_config(None, _overrides(workspace, tmp_path, "ray.address=127.0.0.1:9", "ray.connect_timeout_s=5"))
    started = time.monotonic()
    with pytest.raises(DastraError, match=r"ray.address '127.0.0.1:9' is not reachable"):
        cluster.connect(cfg.ray)
    assert time.monotonic() - started < 30
    assert not ray.is_initialized()


def test_deepspeed_json_that_contradicts_the_run_config_is_named(workspace: Path, tmp_path: Path):
    stage3 = tmp_path / "ds.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(None, _overrides(workspace, tmp_path, "deepspeed.stage=2", f"deepspeed.config={stage3}"))
    with pytest.raises(DastraError, match=r"zero_optimization.stage is 3 but deepspeed.stage is 2"):
        load_ds_config(cfg)
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    cfg = load_config(None, _overrides(workspace, tmp_path, "deepspeed.stage=3", f"deepspeed.config={bf16}"))
    with pytest.raises(DastraError, match=r"bf16.enabled is true but model.dtype is float32"):
        load_ds_config(cfg)
    cfg = load_config(None, _overrides(workspace, tmp_path, "deepspeed.stage=3", "model.dtype=float64"))
    with pytest.raises(DastraError, match=r"model.dtype float64 cannot be partitioned by ZeRO-3"):
        load_ds_config(cfg)
    # opening a run checks it before any cluster starts; stage 1/2 JSONs are run as stage 0
    with pytest.raises(DastraError, match=r"zero_optimization.stage is 3"):
        _context(workspace, tmp_path, "deepspeed.stage=1", f"deepspeed.config={stage3}")
    cfg = load_config(None, _overrides(workspace, tmp_path, "deepspeed.stage=2"))
    assert load_ds_config(cfg)["zero_optimization"]["stage"] == 0
    # the exact GGN product needs whole parameters
    with pytest.raises(DastraError, match=r"solver.product=fisher"):
        solve_mode(load_config(None, ["deepspeed.stage=3", "solver.product=ggn"]))
    modes = {
        (workers, stage, product): solve_mode(load_config(None, [
            f"ray.num_workers={workers}", f"deepspeed.stage={stage}", f"solver.product={product}"]))
        for workers, stage, product in ((1, 0, "ggn"), (2, 0, "ggn"), (2, 0, "fisher"), (2, 3, "fisher"))
    }
    assert list(modes.values()) == ["queries", "queries", "data", "data"]


def test_work_assignment_helpers():
    assert [slice_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    owner = balance_by_cost({"a": 8.0, "b": 5.0, "c": 4.0, "d": 1.0}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}


# ------------------------------------------------------------------------------------------ cluster
def test_more_workers_than_cpus_is_a_clear_error(ray_session, workspace: Path, tmp_path: Path):
    ctx = _context(workspace, tmp_path, "ray.num_workers=5")
    started = time.monotonic()
    with pytest.raises(DastraError, match=r"ray.num_workers=5 .* needs 5 CPU but the cluster has 4"):
        _stages(ctx, "fit")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "factors").exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fit_on_two_ranks_equals_single_process(
    ray_session, single: Path, workspace: Path, tmp_path: Path, stage, capsys
):
    ctx = _context(workspace, tmp_path, *DISTRIBUTED, f"deepspeed.stage={stage}")
    (out,) = _stages(ctx, "fit")
    group = ctx.executor.group_for(ctx.cfg)
    if stage in (1, 2):
        assert "engines run as stage 0" in capsys.readouterr().err
    reports = group.reports
    total = reports[0]["parameters"]
    if stage == 3:  # each rank stores half of the model, and no whole parameter exists outside a forward
        for report in reports:
            assert abs(report["local_parameters"] - total / 2) <= 0.01 * total
            assert report["materialised_parameters"] == 0
    else:
        assert all(r["local_parameters"] == total for r in reports)
    assert {r["fingerprint"] for r in reports} == {ctx.fingerprint}

    expected, got = load_factors(single / "factors"), load_factors(tmp_path / "factors")
    assert json.loads((tmp_path / "factors" / "meta.json").read_text()).keys() == json.loads(
        (single / "factors" / "meta.json").read_text()
    ).keys()
    assert (got.num_tokens, got.num_sequences, got.num_lambda_sequences) == (
        expected.num_tokens, expected.num_sequences, expected.num_lambda_sequences,
    )
    for name in expected.names:
        e, g = expected[name], got[name]
        assert _rel(g.lambda_, e.lambda_) <= RTOL
        # eigenvalues, Q diag(λ) Qᵀ, and eigenvectors up to sign within their Davis-Kahan bounds (a sign-aligned
        # column comparison fails wherever round-off rotates a near-degenerate pair)
        assert_same_eigendecomposition(g.eigval_a, g.q_a, e.eigval_a, e.q_a, RTOL)
        assert_same_eigendecomposition(g.eigval_s, g.q_s, e.eigval_s, e.q_s, RTOL)
    # each module's factors were held (and written) by its owner only: every rank at most total/N + the largest
    module_bytes = {n: sum(t.numel() * t.element_size() for t in vars(expected[n]).values()) for n in expected.names}
    total, largest = sum(module_bytes.values()), max(module_bytes.values())
    assert sum(out["resident_bytes"]) == total
    assert all(b > 0 for b in out["sent_bytes"])  # every rank sent its ā and Ds of the modules it does not own
    assert all(0 < held <= total / 2 + largest for held in out["resident_bytes"]), (out["resident_bytes"], total)
    shards = {f for f in json.loads((tmp_path / "factors" / "meta.json").read_text())["ekfac"]["files"].values()}
    assert shards == {"factors-00000.safetensors", "factors-00001.safetensors"}
    if stage == 0:  # the planner's factors of the busiest owner are what that rank really held
        planned = {s.stage: s.resident for s in make_plan(ctx.cfg, gpus=2, search=False).stages}
        assert planned["eigenvalue correction"] == max(out["resident_bytes"])


@pytest.mark.parametrize("stage", [0, 3])
def test_query_gradients_on_two_ranks_are_sharded_by_owner(
    ray_session, single: Path, workspace: Path, tmp_path: Path, stage
):
    ctx = _context(workspace, tmp_path, *DISTRIBUTED, f"deepspeed.stage={stage}")
    _stages(ctx, "query")
    names = list(ctx.tracked)
    expected = load_file(str(single / "queries" / "gradients-00000.safetensors"))
    files = json.loads((tmp_path / "queries" / "meta.json").read_text())["files"]
    owners = run_owners(ctx.cfg, {n: t.shape for n, t in ctx.tracked.items()}, 2)
    assert files == {n: f"gradients-{owners[n]:05d}.safetensors" for n in names}
    held = []
    for rank in (0, 1):  # each shard holds exactly its rank's modules, equal to the one-rank gradients
        shard = load_file(str(tmp_path / "queries" / f"gradients-{rank:05d}.safetensors"))
        assert sorted(shard) == sorted(owned(owners, rank)) != []
        for name, g in shard.items():
            assert _rel(g, expected[name]) <= RTOL
        held.append(sum(g.numel() * g.element_size() for g in shard.values()))
    sizes = [g.numel() * g.element_size() for g in expected.values()]
    assert sum(held) == sum(sizes) and max(held) <= sum(sizes) / 2 + max(sizes) < sum(sizes)
    logged = [json.loads(line).get("query/max_rank_gradient_bytes")
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [b for b in logged if b is not None] == [max(held)]
    planned = {s.stage: s.resident for s in make_plan(ctx.cfg, gpus=2, search=False).stages}
    assert planned["query gradients"] == max(held)  # the busiest owner's gradients, written in place


def _copy_inputs(source: Path, run_dir: Path) -> None:
    for name in ("factors", "queries"):
        shutil.copytree(source / name, run_dir / name)


@pytest.mark.parametrize(
    "stage, mode, product, micro",
    [(0, "queries", "ggn", None), (0, "data", "ggn", None), (3, "data", "fisher", None), (0, "modules", "ggn", None),
     (3, "modules", "fisher", None), (0, "data", "ggn", 1), (3, "modules", "fisher", 3), (0, "queries", "fisher", None), (0, "modules", "fisher", None)],
)
def test_astra_on_two_ranks_equals_single_process(
    ray_session, single: Path, single_fisher: Path, workspace: Path, tmp_path: Path, stage, mode, product, micro
):
    """The references solve whole minibatches in one process; `micro` sums each product over micro-batches."""
    reference = single if product == "ggn" else single_fisher
    _copy_inputs(reference, tmp_path)
    extra = [f"deepspeed.stage={stage}", f"ray.solve_mode={mode}", f"solver.product={product}"]
    if micro is not None:
        extra.append(f"solver.micro_batch_size={micro}")
    if product == "fisher":
        extra.append("solver.fisher_samples=2")
    _stages(_context(workspace, tmp_path, *DISTRIBUTED, *extra), "solve")
    expected = load_file(str(reference / "ihvp" / "astra" / "directions.safetensors"))
    got = load_file(str(tmp_path / "ihvp" / "astra" / "directions.safetensors"))
    ids = [json.loads((d / "ihvp" / "astra" / "meta.json").read_text())["query_ids"] for d in (tmp_path, reference)]
    assert ids[0] == ids[1] == [q["query_id"] for q in QUERIES]
    for name, x in expected.items():
        assert _rel(got[name], x) <= RTOL
    # communication per iteration (collectives.sent_bytes): data mode all-reduces the chunk's [2, D] product;
    # modules mode with the Fisher product only per-sequence coefficients and scalars (the GGN product's are
    # output-space tangents, B x T x vocabulary per query)
    sent = [json.loads(line).get("solve/astra/max_rank_sent_bytes_per_iteration")
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sent = [b for b in sent if b is not None][-1]
    block = 2 * sum(x[0].numel() * x.element_size() for x in expected.values())
    if mode == "data":
        assert sent >= block, (sent, block)
    if mode == "modules" and product == "fisher":
        assert 0 < sent < block / 100, (sent, block)
    if mode == "modules":  # each rank held v and the iterate of its own modules only: at most total/N + the largest
        total, held = (_max_rank_state_bytes(d) for d in (reference, tmp_path))
        elements = {n: x[0].numel() for n, x in expected.items()}
        largest = total * max(elements.values()) / sum(elements.values())
        assert 0 < held <= total / 2 + largest < total, (held, total, largest)
    trace = pq.read_table(tmp_path / "ihvp" / "astra" / "trace.parquet")
    expected_trace = pq.read_table(reference / "ihvp" / "astra" / "trace.parquet")
    assert sorted(trace.select(["query_id", "query", "iteration"]).to_pylist(), key=str) == sorted(
        expected_trace.select(["query_id", "query", "iteration"]).to_pylist(), key=str
    )
    # the held-out evaluation on the same fixed batch gives the same h at the same iterations
    held = pq.read_table(tmp_path / "ihvp" / "astra" / "heldout.parquet").to_pylist()
    expected_held = pq.read_table(reference / "ihvp" / "astra" / "heldout.parquet").to_pylist()
    key = lambda r: (r["query_id"], r["repeat"], r["iteration"])  # noqa: E731
    assert sorted(map(key, held)) == sorted(map(key, expected_held))
    by_key = {key(r): r["objective"] for r in expected_held}
    for r in held:
        assert r["objective"] == pytest.approx(by_key[key(r)], rel=RTOL, abs=1e-10)
    # the tracker gets the aggregate series on one continuous iteration axis, as the single-process solve logs them
    for name in ("solve/astra/objective_mean", "solve/astra/heldout/objective_mean"):
        got_series, expected_series = _aggregate_series(tmp_path, name), _aggregate_series(reference, name)
        assert [step for step, _ in got_series] == [step for step, _ in expected_series] != []
        assert torch.allclose(torch.tensor([v for _, v in got_series]), torch.tensor([v for _, v in expected_series]),
                              rtol=RTOL, atol=1e-10)


def _max_rank_state_bytes(run_dir: Path) -> int:
    """The largest solver state (query gradients and iterates) a rank held in the run's last ASTRA solve."""
    held = [json.loads(line).get("solve/astra/max_rank_state_bytes")
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b for b in held if b is not None][-1]


def _aggregate_series(run_dir: Path, name: str) -> list[tuple[int, float]]:
    """(solve/astra/iteration, value) of `name` in the run's metrics.jsonl, from the last solve logged; no key per
    query anywhere."""
    series: list[tuple[int, float]] = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert not any(key.startswith("solve/astra/objective/q") for key in record)
        if name in record:
            step = record["solve/astra/iteration"]
            if series and step < series[-1][0]:  # a later solve starts the series again
                series.clear()
            series.append((step, record[name]))
    return series


def test_every_rank_step_sees_the_drivers_current_config(ray_session, workspace: Path, tmp_path: Path):
    """A worker group outlives stages (it is keyed by the model and Ray settings), so each step carries the driver's
    config: a ZeRO-3 fit followed by a Fisher solve on the same group once ran the fit config's GGN product."""
    for product in ("ggn", "fisher", "ggn"):
        ctx = _context(workspace, tmp_path, *DISTRIBUTED, f"solver.product={product}")
        try:
            seen = ctx.executor.map(lambda rank: rank.cfg.solver.product, cfg=ctx.cfg, what="config probe")
        finally:
            ctx.tracker.close()
        assert seen == [product, product]


def test_the_iterations_moved_away_from_the_ekfac_start(single: Path, workspace: Path, tmp_path: Path):
    """Guards the comparison above: 12 ASTRA iterations change the directions well beyond the tolerance."""
    _copy_inputs(single, tmp_path)
    _stages(_context(workspace, tmp_path, "solver.name=ekfac"), "solve")
    ekfac_x = load_file(str(tmp_path / "ihvp" / "ekfac" / "directions.safetensors"))
    astra_x = load_file(str(single / "ihvp" / "astra" / "directions.safetensors"))
    assert max(_rel(astra_x[n], ekfac_x[n]) for n in ekfac_x) > 1e-3


# ------------------------------------------------------------------------------------------ scoring
def _prepare_scoring(single: Path, run_dir: Path) -> None:
    _copy_inputs(single, run_dir)
    shutil.copytree(single / "ihvp", run_dir / "ihvp")


def _assert_same_topk(got_dir: Path, expected_dir: Path) -> None:
    got = pq.read_table(got_dir / "topk.parquet").to_pylist()
    expected = pq.read_table(expected_dir / "topk.parquet").to_pylist()
    assert [(r["query_id"], r["rank"], r["doc_id"], r["text"]) for r in got] == [
        (r["query_id"], r["rank"], r["doc_id"], r["text"]) for r in expected
    ]
    for g, e in zip(got, expected):
        assert g["score"] == pytest.approx(e["score"], rel=RTOL)


def test_two_scoring_workers_survive_a_killed_actor(ray_session, single: Path, workspace: Path, tmp_path: Path):
    _prepare_scoring(single, tmp_path)
    original: list[int] = []

    def kill_one(shard_id: int, pids: list[int]) -> None:
        if not original:  # both workers hold shards in flight: this kills one in the middle of a shard
            original.extend(pids)
            os.kill(pids[1], signal.SIGKILL)

    ctx = _context(workspace, tmp_path, *DISTRIBUTED)
    try:
        pipeline.score(ctx, on_shard=kill_one)
    finally:
        ctx.tracker.close()
    _assert_same_topk(tmp_path, single)
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert sorted(int(s) for s in manifest["shards"]) == list(range(12))  # 48 rows / data.shard_rows=4
    assert sum(r["num_documents"] for r in manifest["shards"].values()) == 48
    pids = {r["worker_pid"] for r in manifest["shards"].values()}
    assert pids - set(original), "the restarted actor (a new process) scored the retried shard and later ones"


DRIVER = textwrap.dedent(
    """
    import sys, time
    from distributed_astra import context, pipeline
    from distributed_astra.config import load_config
    ctx = context.open_context(load_config(None, sys.argv[1:]), "test")
    pipeline.score(ctx, on_shard=lambda shard_id, pids: time.sleep(0.5))
    """
)


def test_a_killed_driver_resumes_without_redoing_finished_shards(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    _prepare_scoring(single, tmp_path)
    overrides = _overrides(workspace, tmp_path, *DISTRIBUTED, f"ray.address={ray_session}")
    manifest_path = tmp_path / "scores" / "manifest.json"
    log = tmp_path / "driver.log"
    with log.open("wb") as err:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, *overrides], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if manifest_path.is_file() and len(json.loads(manifest_path.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, log.read_text()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = json.loads(manifest_path.read_text())["shards"]
    assert 2 <= len(before) < 12

    ctx = _context(workspace, tmp_path, *DISTRIBUTED)
    try:
        pipeline.score(ctx)
    finally:
        ctx.tracker.close()
    after = json.loads(manifest_path.read_text())["shards"]
    assert len(after) == 12
    for shard_id, record in before.items():  # finished shards were not recomputed: their records are untouched
        assert after[shard_id] == record
    _assert_same_topk(tmp_path, single)


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_runs_the_whole_pipeline_distributed_under_zero3(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    overrides = _overrides(workspace, tmp_path, *DISTRIBUTED, "deepspeed.stage=3", "solver.name=ekfac")
    result = CliRunner().invoke(app, ["run", *[a for o in overrides for a in ("--set", o)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ZeRO stage 3" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_queries"] == 3
    expected = load_factors(single / "factors")
    got = load_factors(tmp_path / "factors")
    for name in expected.names:
        assert _rel(got[name].lambda_, expected[name].lambda_) <= RTOL
    assert len(json.loads((tmp_path / "scores" / "manifest.json").read_text())["shards"]) == 12


def test_data_split_is_read_by_every_path_on_two_ranks(ray_session, workspace: Path, tmp_path: Path):
    """A DatasetDict folder whose `other` split holds other documents than `train`: the fit, the solve's
    minibatches, the scoring shards and the top-k texts of 2 ranks read `data.split` as one process does."""
    from datasets import Dataset, DatasetDict

    train = corpus_rows(24, first_id=1000)
    other = corpus_rows(40, first_id=5000, min_words=10)
    folder = tmp_path / "splits"
    DatasetDict({"train": Dataset.from_list(train), "other": Dataset.from_list(other)}).save_to_disk(str(folder))
    split = ("data.split=other", f"data.corpus={folder}", "solver.baselines=[]")
    single_dir, ranks_dir = tmp_path / "single", tmp_path / "ranks"
    one = _stages(_context(workspace, single_dir, *split), "fit", "query", "solve", "score")
    two = _stages(_context(workspace, ranks_dir, *split, *DISTRIBUTED), "fit", "query", "solve", "score")
    assert one[0]["num_sequences"] == two[0]["num_sequences"] > 40  # the 40 `other` documents (some longer than 32 tokens)
    texts = {r["doc_id"]: r["text"] for r in other}
    for table in (one[3], two[3]):
        rows = table.to_pylist()
        assert rows and all(r["doc_id"] in texts and r["text"] == texts[r["doc_id"]] for r in rows)
    assert [r["doc_id"] for r in one[3].to_pylist()] == [r["doc_id"] for r in two[3].to_pylist()]


def test_100_queries_are_scored_in_one_pass_on_two_ranks_as_on_one(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    """Every query in one corpus pass: one forward per sequence (scoring.batch_size=1) whatever the number of
    queries, counted by a forward hook on the scoring model; 2 replicas, and 2 ZeRO-3 ranks that forward the
    batches in turn with the directions held by their modules' owners, give 1 rank's top-k."""
    queries = [{"query_id": i, "prompt": f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i) % len(WORDS)]}",
                "completion": f" {WORDS[(3 * i + 1) % len(WORDS)]}"} for i in range(100)]
    queries_file = tmp_path / "queries-100.parquet"
    pq.write_table(pa.Table.from_pylist(queries), queries_file)
    extra = (f"data.queries={queries_file}", "solver.name=ekfac", "scoring.batch_size=1", "solver.query_batch_size=50")
    dirs = [tmp_path / "one", tmp_path / "replicas", tmp_path / "modules"]
    for run_dir, ranks in zip(dirs, ((), DISTRIBUTED, (*DISTRIBUTED, "deepspeed.stage=3"))):
        shutil.copytree(single / "factors", run_dir / "factors")
        ctx = _context(workspace, run_dir, *extra, *ranks)
        forwards = [0]
        hook = ctx.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        try:
            pipeline.query(ctx)
            pipeline.solve(ctx)
            before = forwards[0]
            pipeline.score(ctx)
        finally:
            hook.remove()
            ctx.tracker.close()
        shards = json.loads((run_dir / "scores" / "manifest.json").read_text())["shards"].values()
        sequences = sum(s["num_sequences"] for s in shards)
        assert sequences >= 48 and sum(s["num_forwards"] for s in shards) == sequences
        if not ranks:  # in process the scoring model is the context's: the hook saw every forward
            assert forwards[0] - before == sequences
    for run_dir in dirs[1:]:
        _assert_same_topk(run_dir, dirs[0])
    assert pq.read_table(dirs[2] / "topk.parquet").num_rows == 100 * 5


@pytest.mark.parametrize(
    "storage", [(), ("scoring.direction_rank=2", "scoring.direction_dtype=bfloat16")], ids=["whole", "rank2-bf16"]
)
@pytest.mark.parametrize("stage", [0, 3])
def test_scoring_by_module_owners_on_two_ranks_equals_one_rank(
    ray_session, single: Path, workspace: Path, tmp_path: Path, stage: int, storage: tuple[str, ...]
):
    """`ray.score_mode: modules`: each rank holds only its modules' directions (whole, or rank-2 bfloat16
    factors) and every batch is forwarded once by one rank; the top-k equals one process holding them all."""
    reference, ranks_dir = tmp_path / "one", tmp_path / "two"
    storage = (*storage, "scoring.batch_size=2")  # a shard is 2-3 batches: steps of 2 ranks, padded at the end
    for run_dir in (reference, ranks_dir):
        _prepare_scoring(single, run_dir)
    _stages(_context(workspace, reference, *storage), "score")
    ctx = _context(workspace, ranks_dir, *DISTRIBUTED, f"deepspeed.stage={stage}", "ray.score_mode=modules",
                   *storage)
    modules = {name: stored_direction(x, ctx.cfg.scoring, product_dtype(ctx.model, ctx.stat_dtype)).nbytes
               for name, x in load_file(str(ranks_dir / "ihvp" / "astra" / "directions.safetensors")).items()}
    _stages(ctx, "score")
    _assert_same_topk(ranks_dir, reference)
    total, largest = sum(modules.values()), max(modules.values())
    for shard in json.loads((ranks_dir / "scores" / "manifest.json").read_text())["shards"].values():
        held = shard["direction_bytes"]
        assert len(held) == 2 and sum(held) == total  # each module's directions are held by one rank, once
        assert max(held) <= total / 2 + largest and max(held) < total
        assert shard["num_forwards"] == -(-shard["num_sequences"] // 2)  # the ranks forward the batches in turn
    planned = {s.stage: s.resident for s in make_plan(ctx.cfg, gpus=2, search=False).stages}
    assert planned["scoring"] == max(held)  # the planner's busiest owner holds what that rank really held


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("ranks", [(), (*DISTRIBUTED, "deepspeed.stage=3", "ray.score_mode=modules")],
                         ids=["one-rank", "two-ranks-zero3-modules"])
def test_queries_in_chunks_take_one_pass_each_resume_and_give_the_one_pass_scores(
    ray_session, single: Path, workspace: Path, tmp_path: Path, capsys, ranks: tuple[str, ...]
):
    """`scoring.queries_per_pass=2` for 3 queries: two passes over the corpus in one `score` (it says so), each with
    its own manifest; interrupted in the second pass and re-run, the first pass's shards are not redone; the top-k
    and every document's dense scores equal one pass over every query."""
    reference, chunked = tmp_path / "one-pass", tmp_path / "chunked"
    for run_dir in (reference, chunked):
        _prepare_scoring(single, run_dir)
    _stages(_context(workspace, reference, "scoring.dense=true"), "score")
    settings = ("scoring.dense=true", "scoring.queries_per_pass=2", *ranks)
    seen: list[int] = []

    def stop_in_second_pass(shard_id: int, pids: list[int]) -> None:
        seen.append(shard_id)
        if len(seen) == 12 + 3:  # 12 shards in the first pass, then 3 of the second
            raise _Interrupted

    ctx = _context(workspace, chunked, *settings)
    try:
        with pytest.raises(_Interrupted):
            pipeline.score(ctx, on_shard=stop_in_second_pass)
    finally:
        ctx.tracker.close()
    assert "3 queries in 2 passes over the corpus, at most 2 at a time" in capsys.readouterr().err
    first, second = (chunked / "scores" / f"queries-{a:06d}-{b:06d}" / "manifest.json" for a, b in ((0, 2), (2, 3)))
    before = json.loads(first.read_text())["shards"]
    assert len(before) == 12 and len(json.loads(second.read_text())["shards"]) == 3

    _stages(_context(workspace, chunked, *settings), "score")
    assert json.loads(first.read_text())["shards"] == before  # the finished pass was not redone
    _assert_same_topk(chunked, reference)
    for manifest in (first, second):
        shards = json.loads(manifest.read_text())["shards"].values()
        assert len(shards) == 12  # one forward per batch of scoring.batch_size=8 in each pass, whatever the queries
        assert all(s["num_forwards"] == -(-s["num_sequences"] // 8) for s in shards)
    got, want = (pq.read_table(d / "scores" / "dense.parquet") for d in (chunked, reference))
    assert got.column_names == want.column_names and got.column("doc_id") == want.column("doc_id")
    for name in got.column_names[1:]:
        g, w = (torch.tensor(t.column(name).to_numpy()) for t in (got, want))
        assert _rel(g, w) <= RTOL, name


# ------------------------------------------------------------------------------------------ a rank killed mid-step
def _kill_rank_once_busy(executor: RayExecutor, cpu_s: float = 0.02) -> threading.Thread:
    """Kills rank 1's process, from a thread, once it has used `cpu_s` seconds of CPU more than when the worker
    group existed: as soon as the step the caller starts next keeps it busy (or, if it is idle for long, just
    before that step reaches it). Either way the step fails on rank 0 or finds rank 1 dead; a time delay instead
    would miss a step that finishes sooner on a faster machine."""

    def kill() -> None:
        deadline = time.monotonic() + 120
        while executor.group is None and time.monotonic() < deadline:
            time.sleep(0.001)
        worker = psutil.Process(executor.worker_pids()[1])
        start = sum(worker.cpu_times()[:2])
        while sum(worker.cpu_times()[:2]) - start < cpu_s and time.monotonic() < deadline:
            time.sleep(0.001)
        worker.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stage", [0, 3])
def test_a_rank_killed_mid_fit_is_replaced_and_the_factors_are_identical(
    ray_session, single: Path, workspace: Path, tmp_path: Path, stage: int
):
    ctx = _context(workspace, tmp_path, *DISTRIBUTED, f"deepspeed.stage={stage}")
    ctx.executor.group_for(ctx.cfg)
    before, pids = ctx.executor.restarts, ctx.executor.worker_pids()
    killer = _kill_rank_once_busy(ctx.executor)
    _stages(ctx, "fit")
    killer.join()
    assert ctx.executor.restarts == before + 1 and not set(ctx.executor.worker_pids()) & set(pids)
    expected, got = load_factors(single / "factors"), load_factors(tmp_path / "factors")
    assert got.num_sequences == expected.num_sequences
    for name in expected.names:
        assert _rel(got[name].lambda_, expected[name].lambda_) <= RTOL
        assert_same_eigendecomposition(got[name].eigval_a, got[name].q_a, expected[name].eigval_a, expected[name].q_a,
                                       RTOL)


def test_a_rank_killed_mid_solve_is_replaced_and_the_directions_are_identical(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    _copy_inputs(single, tmp_path)
    ctx = _context(workspace, tmp_path, *DISTRIBUTED, "ray.solve_mode=modules")
    ctx.executor.group_for(ctx.cfg)
    before = ctx.executor.restarts
    killer = _kill_rank_once_busy(ctx.executor)
    _stages(ctx, "solve")
    killer.join()
    assert ctx.executor.restarts == before + 1
    expected = load_file(str(single / "ihvp" / "astra" / "directions.safetensors"))
    got = load_file(str(tmp_path / "ihvp" / "astra" / "directions.safetensors"))
    for name, x in expected.items():
        assert _rel(got[name], x) <= RTOL


def test_a_rank_killed_mid_pass_under_zero3_with_low_rank_directions_gives_the_same_topk(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    """Scoring by module owners (ZeRO-3, rank-2 directions): rank 1 is killed after the first shard; the group is
    rebuilt, the unfinished shard re-run, and the top-k is one process's with the same directions."""
    storage = ("scoring.direction_rank=2",)
    reference, ranks_dir = tmp_path / "one", tmp_path / "two"
    for run_dir in (reference, ranks_dir):
        _prepare_scoring(single, run_dir)
    _stages(_context(workspace, reference, *storage), "score")
    ctx = _context(workspace, ranks_dir, *DISTRIBUTED, "deepspeed.stage=3", *storage)
    before, killed = ctx.executor.restarts, []

    def kill_rank_1(shard_id: int, pids: list[int]) -> None:
        if not killed:
            killed.append(pids[1])
            os.kill(pids[1], signal.SIGKILL)

    try:
        pipeline.score(ctx, on_shard=kill_rank_1)
    finally:
        ctx.tracker.close()
    assert killed and ctx.executor.restarts == before + 1 and killed[0] not in ctx.executor.worker_pids()
    _assert_same_topk(ranks_dir, reference)
    assert len(json.loads((ranks_dir / "scores" / "manifest.json").read_text())["shards"]) == 12



# ------------------------------------------------------------------------------------------ four ranks
def test_four_ranks_own_the_state_by_module_and_give_one_process_results(
    ray_session, single: Path, workspace: Path, tmp_path: Path
):
    """4 ranks: the ZeRO-3 fit, then the modules-mode ASTRA solve and the modules-mode scoring from the reference's
    inputs equal one process (rel ≤ 1e-5, same top-k), and every rank holds at most total/4 + the largest module
    of the factors, of the solver state and of the directions. Last in the module: the group is rebuilt for it."""
    four = ("ray.num_workers=4",)
    fit_dir, run_dir = tmp_path / "fit", tmp_path / "run"
    (out,) = _stages(_context(workspace, fit_dir, *four, "deepspeed.stage=3"), "fit")
    expected, got = load_factors(single / "factors"), load_factors(fit_dir / "factors")
    for name in expected.names:
        assert _rel(got[name].lambda_, expected[name].lambda_) <= RTOL
        assert_same_eigendecomposition(got[name].eigval_s, got[name].q_s, expected[name].eigval_s,
                                       expected[name].q_s, RTOL)
    module_bytes = {n: sum(t.numel() * t.element_size() for t in vars(expected[n]).values()) for n in expected.names}
    total, largest = sum(module_bytes.values()), max(module_bytes.values())
    assert len(out["resident_bytes"]) == 4 and sum(out["resident_bytes"]) == total
    assert all(0 < held <= total / 4 + largest for held in out["resident_bytes"]), out["resident_bytes"]

    _copy_inputs(single, run_dir)
    ctx = _context(workspace, run_dir, *four, "ray.solve_mode=modules", "ray.score_mode=modules")
    modules = {name: stored_direction(x, ctx.cfg.scoring, product_dtype(ctx.model, ctx.stat_dtype)).nbytes
               for name, x in load_file(str(single / "ihvp" / "astra" / "directions.safetensors")).items()}
    _stages(ctx, "solve", "score")
    expected_x = load_file(str(single / "ihvp" / "astra" / "directions.safetensors"))
    got_x = load_file(str(run_dir / "ihvp" / "astra" / "directions.safetensors"))
    for name, x in expected_x.items():
        assert _rel(got_x[name], x) <= RTOL
    state, held = _max_rank_state_bytes(single), _max_rank_state_bytes(run_dir)
    share = max(x[0].numel() for x in expected_x.values()) / sum(x[0].numel() for x in expected_x.values())
    assert 0 < held <= state / 4 + state * share < state, (held, state)
    _assert_same_topk(run_dir, single)
    for shard in json.loads((run_dir / "scores" / "manifest.json").read_text())["shards"].values():
        assert len(shard["direction_bytes"]) == 4 and sum(shard["direction_bytes"]) == sum(modules.values())
        assert max(shard["direction_bytes"]) <= sum(modules.values()) / 4 + max(modules.values())


def test_four_ranks_with_two_tracked_modules_leave_two_ranks_to_data_work(
    ray_session, workspace: Path, tmp_path: Path
):
    """More ranks than tracked modules: the two ranks that own none still take their share of the batches in the
    ZeRO-3 fit and modules-mode scoring; in the modules-mode solve each shadows a module (computes it, adds zeros to
    every sum over ranks, returns nothing). Factors, directions and top-k equal one process, and every rank holds at
    most the largest module's solver state."""
    two = ('model.tracked_modules=["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]', "solver.product=fisher",
           "solver.lr=0.2", "solver.baselines=[]")  # lr 0.2: no query falls back to EK-FAC on these 2 modules
    reference, ranks = tmp_path / "one", tmp_path / "four"
    _stages(_context(workspace, reference, *two), "fit", "query", "solve", "score")
    assert DIVERGED not in json.loads((reference / "ihvp" / "astra" / "meta.json").read_text())["status"]
    four = (*two, "ray.num_workers=4", "deepspeed.stage=3", "ray.solve_mode=modules", "ray.score_mode=modules")
    (out,) = _stages(_context(workspace, ranks, *four), "fit")
    assert sorted(out["resident_bytes"])[:2] == [0, 0] and min(sorted(out["resident_bytes"])[2:]) > 0
    expected, got = load_factors(reference / "factors"), load_factors(ranks / "factors")
    for name in expected.names:
        assert _rel(got[name].lambda_, expected[name].lambda_) <= RTOL
    _stages(_context(workspace, ranks, *four), "query", "solve", "score")
    expected_x = load_file(str(reference / "ihvp" / "astra" / "directions.safetensors"))
    got_x = load_file(str(ranks / "ihvp" / "astra" / "directions.safetensors"))
    assert got_x.keys() == expected_x.keys()
    for name, x in expected_x.items():
        assert _rel(got_x[name], x) <= RTOL, name
    state = _max_rank_state_bytes(reference)  # one process: both modules
    largest = max(x[0].numel() for x in expected_x.values()) / sum(x[0].numel() for x in expected_x.values())
    assert 0 < _max_rank_state_bytes(ranks) <= state * largest
    _assert_same_topk(ranks, reference)
