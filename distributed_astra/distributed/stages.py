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
import torch

from distributed_astra.artifacts import DIRECTIONS_FILE, read_directions
from distributed_astra.context import (
    Context,
    factor_meta,
    heldout_meta,
    load_query_gradients,
    solver_logger,
    topk_table,
    write_directions,
)
from distributed_astra.curvature.factors import EkfacFactors, load_factors, save_factors
from distributed_astra.distributed import cluster, solve_mode
from distributed_astra.distributed.fit import rank_fit
from distributed_astra.distributed.memory import rank_memory
from distributed_astra.distributed.score import merge_shards, score_shards
from distributed_astra.distributed.solve import rank_solve
from distributed_astra.distributed.worker_group import WorkerGroup
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import default_damping, mean_eigenvalue
from distributed_astra.ihvp.monitor import heldout_table, trace_table
from distributed_astra.progress import console

_session: dict[str, object] = {"owns_ray": False, "group": None, "key": None}


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
    """Ray connected (an embedded one started when ray.address is null); the context closes the session it opened."""
    if not _session["owns_ray"] and not cluster.ray.is_initialized():
        _session["owns_ray"] = cluster.connect(ctx.cfg.ray)
        atexit.register(close_session)  # a context never closed (a test, an interactive session)
    ctx.own(close_session)


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
        "fit/num_sequences": factors.num_sequences, "fit/mean_lambda": mean_eigenvalue(factors),
        "fit/num_ranks": group.cfg.ray.num_workers, "fit/num_batches": out["num_batches"],
    })
    ctx.tracker.count(tokens=2 * factors.num_tokens, sequences=2 * factors.num_sequences)  # both passes, all ranks
    _log_rank_memory(ctx, group, "fit")
    return factors


def _log_rank_memory(ctx: Context, group: WorkerGroup, scope: str) -> None:
    """`<scope>/ranks_peak_rss_mb` (max over ranks of each worker's lifetime peak) and, on GPUs,
    `<scope>/ranks_cuda_max_allocated_mb` (max over ranks, this stage only): the work runs on the ranks, so the
    driver's own `<scope>/peak_rss_mb` (tracking.StageMeter) does not see it."""
    memory = group.call(rank_memory, what="memory")
    metrics = {f"{scope}/ranks_peak_rss_mb": max(m["peak_rss_mb"] for m in memory)}
    if all("cuda_max_allocated_mb" in m for m in memory):
        metrics[f"{scope}/ranks_cuda_max_allocated_mb"] = max(m["cuda_max_allocated_mb"] for m in memory)
    ctx.tracker.log(metrics)


def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f on the ranks (distributed/solve.py); writes the single-process `ihvp/<solver>/` artifact."""
    cfg = ctx.cfg.solver
    factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    ids, grads = load_query_gradients(ctx)
    damping = default_damping(factors) if cfg.damping == "auto" else float(cfg.damping)
    heldout_info = None
    group = group_for(ctx)
    mode = solve_mode(ctx.cfg) if cfg.name != "ekfac" else "queries"
    started = time.perf_counter()
    per_rank = group.call(rank_solve, str(ctx.corpus), factors, grads, damping, mode, what=f"solve ({cfg.name})")
    pieces = sorted((p for records in per_rank for p in records), key=lambda p: p["start"])
    directions = {n: torch.cat([p["x"][n] for p in pieces]) for n in grads}
    statuses = [s for p in pieces for s in p["status"]]
    if len(statuses) != len(ids):
        raise DastraError(f"internal: the ranks solved {len(statuses)} of {len(ids)} queries")
    trace = heldout = None
    if cfg.name != "ekfac":
        traces, held = [], []
        for p in pieces:
            for key, tables, to_table in (("trace", traces, trace_table), ("heldout", held, heldout_table)):
                columns = dict(p[key])
                columns["query"] = [p["start"] - p["chunk_start"] + q for q in columns["query"]]
                columns["query_id"] = [str(ids[int(q)]) for q in columns["query_id"]]
                tables.append(to_table(columns))
        trace = pa.concat_tables(traces)
        if any(p["heldout_batch_size"] for p in pieces):
            heldout = pa.concat_tables(held)
            heldout_info = {
                **heldout_meta(cfg, sum(p["heldout_seconds"] for p in pieces), sum(p["seconds"] for p in pieces)),
                "batch_size": max(p["heldout_batch_size"] for p in pieces),
            }
    write_directions(ctx, ids, directions, statuses, damping, trace, heldout, heldout_info)
    if cfg.name != "ekfac":
        _log_trace(ctx, pieces, trace, heldout)
        ctx.tracker.count(query_iterations=trace.num_rows)
    for p in pieces:
        for message in p["messages"]:
            console.print(f"[yellow]warning:[/] {message}", highlight=False)
    seconds = time.perf_counter() - started
    ranks = group.cfg.ray.num_workers
    cluster.note(f"solve ({cfg.name}, mode {mode}) on {ranks} ranks: {len(ids)} queries, {seconds:.1f} s")
    scope = f"solve/{cfg.name}"
    ctx.tracker.log({
        f"{scope}/damping": damping, f"{scope}/num_ranks": ranks,
        **{f"{scope}/num_{s}": statuses.count(s) for s in set(statuses)},
        **({f"{scope}/heldout/cost_fraction": heldout_info["cost_fraction"]} if heldout_info else {}),
    })
    _log_rank_memory(ctx, group, scope)
    return damping


def _log_trace(ctx: Context, pieces: list[dict], trace: pa.Table, heldout: pa.Table | None) -> None:
    """The ranks' convergence traces into the tracker as single-process solves log them while they run
    (context.solver_logger): chunk after chunk on one continuous iteration axis, per iteration the aggregates over
    the chunk's running queries, the held-out evaluations at their iterations; then the tables and charts once."""
    logger = solver_logger(ctx)
    iterations = ctx.cfg.solver.iterations
    for chunk_start in sorted({p["chunk_start"] for p in pieces}):
        members = [p for p in pieces if p["chunk_start"] == chunk_start]
        size = max(p["stop"] for p in members) - chunk_start
        on_iteration, on_heldout = logger.chunk(list(range(chunk_start, chunk_start + size)))
        events: dict[tuple[int, int], dict] = {}  # (step, 0 held-out | 1 minibatch) -> values per chunk position
        for p in members:
            for kind, key in ((1, "trace"), (0, "heldout")):
                rows = p[key]
                for j, q in enumerate(rows["query"]):
                    step = rows["repeat"][j] * iterations + rows["iteration"][j]
                    event = events.setdefault((step, kind), {
                        "h": torch.full((size,), float("nan"), dtype=torch.float64),
                        "r": torch.full((size,), float("nan"), dtype=torch.float64), "lr": float("nan"),
                    })
                    position = p["start"] - chunk_start + q
                    event["h"][position], event["r"][position] = rows["objective"][j], rows["residual"][j]
                    if kind == 1:
                        event["lr"] = rows["lr"][j]
        for (step, kind), event in sorted(events.items()):
            if kind == 1:
                on_iteration(step, event["h"], event["r"], event["lr"])
            else:
                on_heldout(step, event["h"], event["r"])
    logger.finish(trace, heldout)


def _directions_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score(ctx: Context, on_shard=None) -> pa.Table:
    """Shards scored on `ray.num_workers` actors, resumable from scores/manifest.json, merged into topk.parquet."""
    cfg = ctx.cfg
    solver_dir = ctx.paths.ihvp(cfg.solver.name)
    query_ids, tensors = read_directions(solver_dir, ctx.model_meta())
    directions_file = solver_dir / DIRECTIONS_FILE
    plan = ctx.open_corpus().shard_plan(cfg.data.shard_rows)
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
    manifest = score_shards(
        cfg, model_source(ctx), str(ctx.corpus), plan, tensors, scores_dir, meta, on_shard=on_shard
    )
    scores, doc_ids = merge_shards(scores_dir, [int(s) for s in manifest["shards"]], len(query_ids), cfg.scoring.top_k)
    table = topk_table(ctx, query_ids, scores, doc_ids)
    num_documents = sum(rec["num_documents"] for rec in manifest["shards"].values())
    scope = f"score/{cfg.solver.name}"
    ctx.tracker.log({
        f"{scope}/num_documents": num_documents, f"{scope}/num_queries": len(query_ids),
        f"{scope}/num_shards": len(manifest["shards"]), f"{scope}/num_actors": cfg.ray.num_workers,
    })
    ctx.tracker.count(sequences=num_documents)
    return table
