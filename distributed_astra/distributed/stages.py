"""The distributed versions of the pipeline's fit, solve and score; `pipeline.py` dispatches here when
`is_distributed(cfg)`. They read and write exactly the single-process artifacts (same files, same meta), so any
stage can be run distributed or not and the next one reads its output.

The driver keeps what is cheap and central: the config, the tokenizer, the model fingerprint, the query gradients
(`query` runs on the driver) and every write to the run directory. One Ray session and one worker group serve all
stages of a process (`group_for`); the group is released before scoring, whose actors need the same CPUs/GPUs.
"""

from __future__ import annotations

import atexit
import hashlib
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from distributed_astra.artifacts import atomic_path, check_meta, read_meta, save_tensors, write_json
from distributed_astra.config import SOURCE_SOLVERS, Config
from distributed_astra.curvature.factors import EkfacFactors, load_factors, save_factors
from distributed_astra.data.corpus import open_corpus
from distributed_astra.distributed import cluster
from distributed_astra.distributed.deepspeed_config import load_ds_config
from distributed_astra.distributed.fit import rank_fit
from distributed_astra.distributed.score import merge_shards, score_shards
from distributed_astra.distributed.solve import rank_solve, solve_mode
from distributed_astra.distributed.worker_group import WorkerGroup
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import default_damping
from distributed_astra.ihvp.monitor import trace_table
from distributed_astra.pipeline import (
    Context,
    directions_meta,
    factor_meta,
    load_query_gradients,
    solver_logger,
    topk_table,
)
from distributed_astra.progress import console

_session: dict[str, object] = {"owns_ray": False, "group": None, "key": None}


def validate(cfg: Config) -> None:
    """Checks that need no cluster (called when the context opens): the DeepSpeed JSON against the run config."""
    load_ds_config(cfg)
    source = [n for n in (cfg.solver.name, *cfg.solver.baselines) if n in SOURCE_SOLVERS]
    if source:
        raise DastraError(
            f"solver '{source[0]}' runs single-process only: set ray.num_workers=1 (and ray.address=null, "
            "deepspeed.stage=0), or pick another solver.name / solver.baselines"
        )
    if cfg.scoring.dense:
        raise DastraError("scoring.dense: the dense N x Q matrix is written by single-process runs only; set it false")


def model_source(ctx: Context) -> str:
    """Where every worker loads the model from (the run's model folder or model.path; a hub id from the cache)."""
    cfg = ctx.cfg.model
    if cfg.source == "tiny":
        return str(ctx.paths.model.resolve())
    return str(Path(cfg.path).resolve()) if cfg.source == "path" else str(cfg.hub_id)


def group_for(ctx: Context) -> WorkerGroup:
    """The worker group of this process, (re)built or reloaded when the model/ray/deepspeed settings changed."""
    cfg = ctx.cfg
    _connect(ctx)
    rc = cfg.ray
    key = (model_source(ctx), cfg.section_hash("model"), rc.address, rc.num_workers, rc.use_gpu, rc.cpus_per_worker)
    group: WorkerGroup | None = _session["group"]  # type: ignore[assignment]
    if group is not None and _session["key"] != key:
        release_group()
        group = None
    if group is None:
        started = time.perf_counter()
        group = WorkerGroup(cfg, model_source(ctx), ctx.fingerprint)
        _session.update(group=group, key=key)
        cluster.note(f"{cfg.ray.num_workers} ranks ready in {time.perf_counter() - started:.1f} s")
    elif group.cfg.deepspeed != cfg.deepspeed:
        group.load(cfg, ctx.fingerprint)
    group.cfg = cfg
    return group


def release_group() -> None:
    group: WorkerGroup | None = _session["group"]  # type: ignore[assignment]
    if group is not None:
        group.close()
    _session.update(group=None, key=None)


def close_session() -> None:
    """Release the worker group and shut down a Ray this process started."""
    release_group()
    if _session["owns_ray"]:
        cluster.shutdown()
        _session["owns_ray"] = False


def _connect(ctx: Context) -> None:
    if not _session["owns_ray"] and not cluster.ray.is_initialized():
        _session["owns_ray"] = cluster.connect(ctx.cfg.ray)
        atexit.register(close_session)


def fit(ctx: Context) -> EkfacFactors:
    """EK-FAC on `ray.num_workers` ranks (distributed/fit.py); the driver saves the factors once."""
    group = group_for(ctx)
    started = time.perf_counter()
    out = group.call(rank_fit, str(ctx.corpus), what="fit")[0]
    factors: EkfacFactors = out["factors"]
    if factors.num_sequences == 0:
        raise DastraError(f"data.corpus '{ctx.corpus}' yields no token sequences; give it non-empty documents")
    save_factors(
        factors, ctx.paths.factors, {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype, "versions": ctx.versions()}
    )
    seconds = time.perf_counter() - started
    cluster.note(
        f"fit on {group.cfg.ray.num_workers} ranks (ZeRO stage {group.stage}): {out['num_batches']} batches, "
        f"{factors.num_sequences} sequences, {seconds:.1f} s"
    )
    ctx.tracker.log({
        "fit/num_sequences": factors.num_sequences, "fit/mean_lambda": default_damping(factors) / 0.1,
        "fit/num_ranks": group.cfg.ray.num_workers, "fit/seconds": seconds,
    })
    return factors


def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f on the ranks (distributed/solve.py); writes the single-process `ihvp/<solver>/` artifact."""
    cfg = ctx.cfg.solver
    factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    ids, grads = load_query_gradients(ctx)
    damping = default_damping(factors) if cfg.damping == "auto" else float(cfg.damping)
    group = group_for(ctx)
    mode = solve_mode(ctx.cfg.ray.solve_mode, group.stage, cfg.product) if cfg.name != "ekfac" else "queries"
    started = time.perf_counter()
    per_rank = group.call(rank_solve, str(ctx.corpus), factors, grads, damping, mode, what=f"solve ({cfg.name})")
    pieces = sorted((p for records in per_rank for p in records), key=lambda p: p["start"])
    directions = {n: torch.cat([p["x"][n] for p in pieces]) for n in grads}
    statuses = [s for p in pieces for s in p["status"]]
    if len(statuses) != len(ids):
        raise DastraError(f"internal: the ranks solved {len(statuses)} of {len(ids)} queries")
    out = ctx.paths.ihvp(cfg.name)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_tensors({"query_ids": ids, **directions}, tmp / "directions.safetensors")
        if cfg.name != "ekfac":
            traces = []
            for p in pieces:
                trace = dict(p["trace"])
                trace["query"] = [p["start"] - p["chunk_start"] + q for q in trace["query"]]
                trace["query_id"] = [str(int(ids[int(q)])) for q in trace["query_id"]]
                traces.append(trace_table(trace))
            trace = pa.concat_tables(traces)
            pq.write_table(trace, tmp / "trace.parquet")
        write_json(
            tmp / "meta.json",
            {
                **directions_meta(ctx),
                "solver": cfg.model_dump(mode="json"),
                "damping": damping,
                "status": {s: statuses.count(s) for s in sorted(set(statuses))},
            },
        )
    if cfg.name != "ekfac":
        _log_trace(ctx, trace)
    for p in pieces:
        for message in p["messages"]:
            console.print(f"[yellow]warning:[/] {message}", highlight=False)
    seconds = time.perf_counter() - started
    ranks = group.cfg.ray.num_workers
    cluster.note(f"solve ({cfg.name}, mode {mode}) on {ranks} ranks: {len(ids)} queries, {seconds:.1f} s")
    ctx.tracker.log({
        "solve/damping": damping, "solve/seconds": seconds,
        **{f"solve/{cfg.name}/num_{s}": statuses.count(s) for s in set(statuses)},
    })
    return damping


def _log_trace(ctx: Context, trace: pa.Table) -> None:
    """The ranks' convergence traces into the tracker, as single-process solves log them while they run: per
    iteration, h and the residual of every query still running (pipeline.solver_logger)."""
    rows = trace.to_pydict()
    query_ids = sorted({int(q) for q in rows["query_id"]})
    column = {q: i for i, q in enumerate(query_ids)}
    log = solver_logger(ctx, query_ids)
    steps: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(rows["repeat"], rows["iteration"])):
        steps.setdefault(key, []).append(i)
    for (_repeat, iteration), members in sorted(steps.items()):
        objective = torch.full((len(query_ids),), float("nan"), dtype=torch.float64)
        residual = torch.full_like(objective, float("nan"))
        for i in members:
            objective[column[int(rows["query_id"][i])]] = rows["objective"][i]
            residual[column[int(rows["query_id"][i])]] = rows["residual"][i]
        log(iteration, objective, residual, rows["lr"][members[0]])


def _directions_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score(ctx: Context, on_shard=None) -> pa.Table:
    """Shards scored on `ray.num_workers` actors, resumable from scores/manifest.json, merged into topk.parquet."""
    cfg = ctx.cfg
    solver_dir = ctx.paths.ihvp(cfg.solver.name)
    check_meta(read_meta(solver_dir, "solved directions", "solve"), ctx.model_meta(), "solved directions", "solve")
    directions_file = solver_dir / "directions.safetensors"
    tensors = load_file(str(directions_file))
    query_ids = tensors.pop("query_ids")
    plan = open_corpus(ctx.corpus, cfg.data.text_column, cfg.data.id_column).shard_plan(cfg.data.shard_rows)
    meta = {
        **ctx.model_meta(),
        "solver": cfg.solver.name,
        "directions": _directions_digest(directions_file),
        "plan": plan.fingerprint,
        "config_hash": cfg.section_hash("data", "scoring"),
    }
    release_group()  # the ranks' CPUs/GPUs go to the scoring actors
    _connect(ctx)
    scores_dir = ctx.paths.scores
    started = time.perf_counter()
    manifest = score_shards(
        cfg, model_source(ctx), str(ctx.corpus), plan, tensors, query_ids, scores_dir, meta, on_shard=on_shard
    )
    scores, doc_ids = merge_shards(scores_dir, [int(s) for s in manifest["shards"]], len(query_ids), cfg.scoring.top_k)
    table = topk_table(ctx, query_ids, scores, doc_ids)
    num_documents = sum(rec["num_documents"] for rec in manifest["shards"].values())
    ctx.tracker.log({
        "score/num_documents": num_documents, "score/num_queries": len(query_ids),
        "score/num_shards": len(manifest["shards"]), "score/seconds": time.perf_counter() - started,
    })
    return table
