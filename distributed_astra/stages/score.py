"""The score stage: τ(z_q, z_m) = X_qᵀ ∇L(z_m) per document, the top-k per query (seeds §1, Eq 2), shard by shard
on the executor, resumable. SOURCE / ASTRA-SOURCE: τ = Σ_ℓ mean_{c ∈ ℓ} w_ℓᵀ ∇L(θ_c, z_m), one pass per checkpoint
over each shard (seeds §6-7).

    corpus --shard_plan(data.shard_rows)--> shards 0..S-1 (stable ids: file + row range)
    executor.map_shards(score_shard): every unfinished shard on a free worker (in process: one after another)
    each finished shard --> scores/shards/shard-<id>.parquet (atomic) + an entry in scores/manifest.json (atomic)
    all shards done --> merge the per-shard top-k --> topk.parquet

A document is one corpus row and never spans two shards, so merging the per-shard top-k's gives the exact top-k. A
re-run reads the manifest and skips every shard recorded there (when the directions, the corpus plan and the data
and scoring settings are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_astra.artifacts import DIRECTIONS_FILE, atomic_path, check_meta, load_tensors, read_meta, write_json
from distributed_astra.config import SOURCE_SOLVERS
from distributed_astra.context import Context, check_directions, note_skipped_rows, topk_table
from distributed_astra.curvature.covariance import STAT_DTYPES, batch_to_device, product_dtype
from distributed_astra.curvature.hooks import GradientCapture
from distributed_astra.data.corpus import CorpusShard, CorpusStats, ShardPlan
from distributed_astra.data.sequences import QueryId
from distributed_astra.distributed import score_mode
from distributed_astra.distributed.collectives import owner_route, padding_batch, sum_over_ranks
from distributed_astra.errors import DastraError
from distributed_astra.execution import Rank
from distributed_astra.ownership import owned, run_owners
from distributed_astra.progress import console, progress_bar
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import Direction, module_scores
from distributed_astra.scoring.low_rank import stored_direction
from distributed_astra.scoring.topk import StreamingTopK
from distributed_astra.source.trajectory import load_trajectory, weights
from distributed_astra.tracking import metered

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DirectionsPass:
    """One pass over a shard: the weights (`checkpoint` of the trajectory, or None for the model's own) and the
    directions scored there, `file` x `scale` (SOURCE: w_ℓ / |C_ℓ|)."""

    checkpoint: int | None
    file: str
    scale: float = 1.0


def held_directions(rank: Rank, passes: Sequence[DirectionsPass], names: list[str], compute: torch.dtype,
                    queries: tuple[int, int]) -> list[dict[str, Direction]]:
    """This rank's directions of `names` and of the queries [q0, q1) for every pass, prepared once per rank and
    kept (`rank.held`) while the files, the queries and the scoring settings stay the same: only these modules and
    queries are read, scaled and kept on the rank's device as `stored_direction` makes them (low-rank factors are
    computed here, on the module's owner)."""
    sc = rank.cfg.scoring
    key = (tuple((p.checkpoint, p.file, p.scale, os.stat(p.file).st_mtime_ns) for p in passes), tuple(names),
           tuple(queries), sc.direction_rank, sc.direction_dtype, compute)
    if rank.held.get("directions_key") != key:
        rank.held.pop("directions", None)  # the previous run's directions go before the new ones are read
        prepared: dict[tuple[str, float], dict[str, Direction]] = {}  # SOURCE: one copy per segment, not checkpoint
        for p in passes:
            if (p.file, p.scale) in prepared:
                continue
            tensors = load_tensors(Path(p.file), "solved directions", "solve", names=names,
                                   rows=slice(queries[0], queries[1]))
            held: dict[str, Direction] = {}
            for name in names:
                x = tensors.pop(name).to(rank.device)
                x = x * p.scale if p.scale != 1.0 else x
                held[name] = stored_direction(x, sc, compute)
            prepared[p.file, p.scale] = held
        rank.held.update(directions=[prepared[p.file, p.scale] for p in passes], directions_key=key)
    return rank.held["directions"]


def rank_steps(rank: Rank, batches: Iterable[dict[str, torch.Tensor]], dtype: torch.dtype
               ) -> Iterator[tuple[list[dict[str, torch.Tensor]], GradientCapture]]:
    """(a step's batches, this rank's capture) for the stream in steps of N consecutive batches: batch r of a step
    is forwarded and captured by rank r, a rank the last step leaves without one runs a `padding_batch` (under
    ZeRO-3 every forward is a collective). One rank: every batch is a step."""
    steps: list[list[dict[str, torch.Tensor]]] = []

    def mine() -> Iterator[dict[str, torch.Tensor]]:
        step: list[dict[str, torch.Tensor]] = []
        for batch in [*batches, None]:
            if batch is not None:
                step.append(batch)
            if step and (batch is None or len(step) == rank.world_size):
                steps.append(step)
                own = step[rank.rank] if rank.rank < len(step) else padding_batch(step[0])
                yield batch_to_device(own, rank.device)
                step = []

    for _, capture in captured_batches(rank.model, rank.tracked, mine(), dtype):
        yield steps.pop(), capture


def step_scores(capture: GradientCapture, directions: dict[str, Direction], owners: dict[str, int],
                rows: list[int], num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """[Σ rows, Q]: the scores of one step's batches (rank order, `rows` sequences each; seeds §1, Eq 2). Each
    module's ā and Ds of every rank's batch reach the module's owner (`owner_route`), which scores them against
    its directions; the partial scores are summed over ranks. One rank: its batch against every module."""
    route = owner_route(owners)
    offsets = [0, *accumulate(rows)]
    partial = torch.zeros(offsets[-1], num_queries, dtype=dtype, device=capture.output_grad(next(iter(owners))).device)
    for name in owners:
        for r, (ds, a) in enumerate(route(name, [capture.output_grad(name), capture.activation(name)])):
            partial[offsets[r] : offsets[r + 1]] += module_scores(ds, a, directions[name])
    return sum_over_ranks(partial)


def score_shard(
    rank: Rank, shard: CorpusShard, corpus: str, passes: Sequence[DirectionsPass], trajectory: str | None,
    queries: tuple[int, int],
) -> dict[str, Any]:
    """The top-k documents of one shard per query of [q0, q1): scores [Q, k'] and document keys [Q, k']
    (k' = min(k, docs)); every document's scores too under `scoring.dense`. The passes' sequence scores add up
    (SOURCE). On a group of N ranks (`ray.score_mode: modules`) the ranks forward the shard's batches in turn
    (`rank_steps`), each holds the directions of the modules it owns (`ownership.run_owners`) and scores every
    rank's ā and Ds of them (`step_scores`): one forward+backward per batch in all, every query of the chunk at
    once. Every rank returns the same top-k; `direction_bytes` and the forward counts are its own."""
    started = time.perf_counter()
    cfg = rank.cfg
    compute = product_dtype(rank.model, STAT_DTYPES[cfg.factors.dtype])
    traj = load_trajectory(trajectory) if trajectory is not None else None
    owners = run_owners(cfg, {n: t.shape for n, t in rank.tracked.items()}, rank.world_size)
    held = held_directions(rank, passes, owned(owners, rank.rank), compute, queries)
    num_queries = queries[1] - queries[0]
    keys: list[torch.Tensor] = []
    totals: list[torch.Tensor] = []
    sequences = tokens = padding = 0
    stats = CorpusStats()
    forwards = [0]  # the model's forward calls on this rank: one per step per pass, whatever the number of queries
    counter = rank.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        for number, (p, directions) in enumerate(zip(passes, held)):
            with weights(rank.model, traj.state(p.checkpoint) if traj is not None else None):
                batches = rank.training_batches(corpus, cfg.scoring.batch_size, shard=shard,
                                                stats=stats if number == 0 else None)
                for j, (step, capture) in enumerate(rank_steps(rank, batches, compute)):
                    padding += rank.rank >= len(step)
                    rows = [len(b["doc_id"]) for b in step] + [1] * (rank.world_size - len(step))
                    scores = step_scores(capture, directions, owners, rows, num_queries, compute)
                    scores = scores[: sum(rows[: len(step)])].cpu()  # the padding batches' rows go
                    if traj is not None:
                        scores = scores.to(torch.float64)  # summed over the checkpoints' passes
                    if number == 0:
                        keys.append(torch.cat([b["doc_id"] for b in step]))
                        totals.append(scores)
                        sequences += len(keys[-1])
                        tokens += sum(int(b["attention_mask"].sum()) for b in step)
                    else:
                        totals[j] += scores
    finally:
        counter.remove()
    top = StreamingTopK(num_queries, cfg.scoring.top_k, keep_all=cfg.scoring.dense)
    for doc_keys, scores in zip(keys, totals):
        top.update(doc_keys, scores)
    best, doc_keys = top.finish()
    result = {
        "shard_id": shard.shard_id, "scores": best, "doc_keys": doc_keys, "num_documents": top.num_documents,
        "num_sequences": sequences, "num_tokens": tokens, "seconds": time.perf_counter() - started, "pid": os.getpid(),
        "skipped": (stats.skipped_empty, stats.skipped_non_utf8), "num_forwards": forwards[0] - padding,
        "direction_bytes": [sum(d.nbytes for h in {id(h): h for h in held}.values() for d in h.values())],
    }
    if cfg.scoring.dense:
        result["all_keys"], result["all_scores"] = top.all_scores() if top.num_documents else (None, None)
    return result


def _shard_file(scores_dir: Path, shard_id: int, kind: str = "shard") -> Path:
    return scores_dir / "shards" / f"{kind}-{shard_id:06d}.parquet"


def _write_shard(scores_dir: Path, result: dict[str, Any]) -> Path:
    """One shard's top-k: (query position, rank, document key, score) rows; topk_table turns them into ids. Under
    `scoring.dense` every document's scores too (dense-<id>.parquet: doc_key, one column per query position)."""
    if result.get("all_keys") is not None:
        dense = pa.table({"doc_key": result["all_keys"].numpy(),
                          **{f"q{i}": column.numpy() for i, column in enumerate(result["all_scores"].t())}})
        with atomic_path(_shard_file(scores_dir, result["shard_id"], "dense")) as tmp:
            pq.write_table(dense, tmp)
    scores, doc_keys = result["scores"], result["doc_keys"]
    num_queries, k = scores.shape
    table = pa.table({
        "query": torch.arange(num_queries).repeat_interleave(k).numpy(),
        "rank": torch.arange(1, k + 1).repeat(num_queries).numpy(),
        "doc_key": doc_keys.flatten().numpy(),
        "score": scores.flatten().numpy(),
    })
    path = _shard_file(scores_dir, result["shard_id"])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def finished_shards(scores_dir: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Shards recorded in the manifest for the same inputs (`meta`) whose files are present; {} otherwise."""
    path = scores_dir / MANIFEST
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("meta") != meta:
        console.print(f"note: {path} was written for other directions, corpus or settings: scoring every shard again",
                      highlight=False)
        return {}
    def present(sid: str, rec: dict[str, Any]) -> bool:
        dense = not meta["dense"] or rec["num_documents"] == 0 or _shard_file(scores_dir, int(sid), "dense").is_file()
        return _shard_file(scores_dir, int(sid)).is_file() and dense

    return {sid: rec for sid, rec in manifest.get("shards", {}).items() if present(sid, rec)}


def merge_shards(scores_dir: Path, shard_ids: list[int], num_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k per query from the per-shard top-k files: (scores [Q, k], document keys [Q, k]), best first."""
    table = pa.concat_tables([pq.read_table(_shard_file(scores_dir, sid)) for sid in sorted(shard_ids)])
    per_query = table.num_rows // num_queries if num_queries else 0
    queries, scores, doc_keys = (torch.tensor(table.column(c).to_numpy()) for c in ("query", "score", "doc_key"))
    order = torch.argsort(queries, stable=True)  # shard order kept within each query
    scores = scores[order].view(num_queries, per_query)
    doc_keys = doc_keys[order].view(num_queries, per_query)
    best, index = torch.topk(scores, min(k, per_query), dim=1)
    return best, torch.gather(doc_keys, 1, index)


def _write_dense(ctx: Context, query_ids: list[QueryId], chunks: list[tuple[Path, list[int]]]) -> None:
    """scores/dense.parquet: the N x Q matrix of every document's scores (`scoring.dense`), from the shards of each
    query chunk (scores dir, shard ids; every chunk's shards list the same documents in the same order)."""
    columns: list[pa.ChunkedArray] = []
    keys: list[int] | None = None
    for scores_dir, shard_ids in chunks:
        files = [_shard_file(scores_dir, sid, "dense") for sid in sorted(shard_ids)]
        table = pa.concat_tables([pq.read_table(f) for f in files if f.is_file()])
        chunk_keys = table.column("doc_key").to_pylist()
        if keys is not None and chunk_keys != keys:
            raise DastraError(f"{scores_dir}: its dense scores list other documents than the first query chunk's: "
                              "delete scores/ and re-run `dastra score`")
        keys = chunk_keys
        columns += [table.column(f"q{i}") for i in range(table.num_columns - 1)]
    doc_ids = ctx.open_corpus().doc_ids(keys)
    dense = pa.table({"doc_id": [doc_ids[key] for key in keys],
                      **{f"q{q}": column for q, column in zip(query_ids, columns)}})
    with atomic_path(ctx.paths.scores / "dense.parquet") as tmp:
        pq.write_table(dense, tmp)


def scoring_passes(ctx: Context) -> tuple[list[QueryId], str | None, list[DirectionsPass]]:
    """(query ids, trajectory or None, the passes) of `solver.name`: one pass at the model's weights, or SOURCE's
    one pass per checkpoint with w_ℓ / |C_ℓ|, checked against the model and the trajectory they were solved for
    (the ranks read the directions files themselves, `held_directions`)."""
    name = ctx.cfg.solver.name
    solver_dir = ctx.paths.ihvp(name)
    meta = read_meta(solver_dir, "solved directions", "solve")
    check_meta(meta, ctx.model_meta(), "solved directions", "solve")
    if name not in SOURCE_SOLVERS:
        path = solver_dir / DIRECTIONS_FILE
        load_tensors(path, "solved directions", "solve", names=[])  # a missing or damaged file fails here
        return meta["query_ids"], None, [DirectionsPass(None, str(path))]
    if "segments" not in meta:
        raise DastraError(f"{solver_dir} holds no SOURCE directions: re-run `dastra solve --method {name}`")
    traj = load_trajectory(meta["trajectory"])
    passes: list[DirectionsPass] = []
    for seg in meta["segments"]:
        path = solver_dir / f"directions_segment{seg['index']}.safetensors"
        load_tensors(path, "solved SOURCE directions", f"solve --method {name}", names=[])
        for c in seg["checkpoints"]:
            if c["index"] >= len(traj.checkpoints) or traj.checkpoints[c["index"]].step != c["step"]:
                raise DastraError(
                    f"trajectory '{meta['trajectory']}' changed since the solve (no checkpoint at step {c['step']}): "
                    f"re-run `dastra solve --method {name}`"
                )
            passes.append(DirectionsPass(c["index"], str(path), 1.0 / len(seg["checkpoints"])))
    return meta["query_ids"], meta["trajectory"], passes


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def query_chunks(num_queries: int, per_pass: int | None) -> list[tuple[int, int]]:
    """[q0, q1) of each pass over the corpus: every query at once, or `scoring.queries_per_pass` at a time."""
    step = max(1, per_pass or num_queries)
    return [(q, min(q + step, num_queries)) for q in range(0, num_queries, step)]


def chunk_dir(scores_dir: Path, queries: tuple[int, int], num_chunks: int) -> Path:
    """Where one query chunk's shards and manifest go: scores/ itself when one pass holds every query."""
    return scores_dir if num_chunks == 1 else scores_dir / f"queries-{queries[0]:06d}-{queries[1]:06d}"


@metered(lambda ctx: f"score/{ctx.cfg.solver.name}")
def score(ctx: Context, on_shard: Callable[[int, list[int]], None] | None = None) -> pa.Table:
    """Every shard of the corpus scored (module docstring), resumable from scores/manifest.json, merged into
    topk.parquet. More queries than `scoring.queries_per_pass` take one pass over the corpus per chunk of them, each
    with its own manifest (scores/queries-<q0>-<q1>/), resumable the same way. `on_shard(shard_id, worker_pids)`
    runs after each shard is recorded (fault-injection tests)."""
    check_directions(ctx)  # before any work: directions of another corpus, data setting or queries are refused
    cfg = ctx.cfg
    query_ids, trajectory, passes = scoring_passes(ctx)
    plan = ctx.open_corpus().shard_plan(cfg.data.shard_rows)
    meta = {
        **ctx.model_meta(), "solver": cfg.solver.name, "directions": _digest(sorted({Path(p.file) for p in passes})),
        "plan": plan.fingerprint,
        "config_hash": cfg.section_hash("data", "scoring"), "dense": cfg.scoring.dense,
    }
    chunks = query_chunks(len(query_ids), cfg.scoring.queries_per_pass)
    if len(chunks) > 1:
        console.print(f"note: {len(query_ids)} queries in {len(chunks)} passes over the corpus, at most "
                      f"{cfg.scoring.queries_per_pass} at a time (scoring.queries_per_pass)", highlight=False)
    scope = f"score/{cfg.solver.name}"
    ctx.tracker.define_axis(scope, f"{scope}/shard")
    progress = {"shards": 0, "of": len(plan.shards) * len(chunks), "sequences": 0, "tokens": 0,
                "started": time.perf_counter()}
    best, keys, manifests = [], [], []  # per chunk
    for queries in chunks:
        scores_dir = chunk_dir(ctx.paths.scores, queries, len(chunks))
        manifest = _score_chunk(ctx, plan, {**meta, "queries": list(queries)}, scores_dir, queries,
                                (str(ctx.corpus), passes, trajectory), progress, on_shard)
        shard_ids = [int(sid) for sid in manifest["shards"]]
        scores, doc_keys = merge_shards(scores_dir, shard_ids, queries[1] - queries[0], cfg.scoring.top_k)
        best.append(scores)
        keys.append(doc_keys)
        manifests.append((scores_dir, shard_ids, manifest))
    first = manifests[0][2]["shards"]  # every chunk reads the same shards
    note_skipped_rows(ctx, *(sum(rec["skipped_rows"][i] for rec in first.values()) for i in (0, 1)))
    table = topk_table(ctx, query_ids, torch.cat(best), torch.cat(keys))
    if cfg.scoring.dense:
        _write_dense(ctx, query_ids, [(d, ids) for d, ids, _ in manifests])
    ctx.tracker.log({
        f"{scope}/num_documents": sum(rec["num_documents"] for rec in first.values()),
        f"{scope}/num_queries": len(query_ids), f"{scope}/num_shards": len(first),
        f"{scope}/num_query_chunks": len(chunks), f"{scope}/num_workers": ctx.executor.world_size,
    })
    ctx.tracker.count(sequences=progress["sequences"], tokens=progress["tokens"])
    return table


def _score_chunk(ctx: Context, plan: ShardPlan, meta: dict[str, Any], scores_dir: Path, queries: tuple[int, int],
                 arguments: tuple, progress: dict[str, Any], on_shard: Callable[[int, list[int]], None] | None
                 ) -> dict[str, Any]:
    """One pass over the corpus for the queries [q0, q1): the unfinished shards of scores_dir's manifest scored and
    recorded one by one (file, then manifest entry, both atomic). Returns the finished manifest."""
    cfg = ctx.cfg
    done = finished_shards(scores_dir, meta)
    todo = [s for s in plan.shards if str(s.shard_id) not in done]
    if done:
        console.print(f"note: resuming: {len(done)} of {len(plan.shards)} shards already scored "
                      f"({scores_dir.relative_to(ctx.paths.scores.parent)}/{MANIFEST}), {len(todo)} to go",
                      highlight=False)
    manifest = {"meta": meta, "plan": plan.to_json(), "shards": dict(done)}
    write_json(scores_dir / MANIFEST, manifest)
    scope = f"score/{cfg.solver.name}"
    progress["shards"] += len(done)
    label = "score shards" + ("" if progress["of"] == len(plan.shards) else f", queries {queries[0]}-{queries[1] - 1}")

    with progress_bar(label, len(plan.shards), "shards") as advance:
        advance(len(done))

        def record(shard: CorpusShard, result: dict[str, Any]) -> None:
            path = _write_shard(scores_dir, result)
            manifest["shards"][str(shard.shard_id)] = {
                "file": str(path.relative_to(scores_dir)), "path": shard.path,
                "rows": [shard.row_start, shard.row_stop], "num_documents": result["num_documents"],
                "num_sequences": result["num_sequences"], "seconds": round(result["seconds"], 4),
                "worker_pid": result["pid"], "finished_at": time.time(), "skipped_rows": list(result["skipped"]),
                "num_forwards": result["num_forwards"], "direction_bytes": result["direction_bytes"],
            }
            write_json(scores_dir / MANIFEST, manifest)
            progress["shards"] += 1
            progress["sequences"] += result["num_sequences"]
            progress["tokens"] += result["num_tokens"]
            elapsed = max(time.perf_counter() - progress["started"], 1e-9)
            ctx.tracker.log({f"{scope}/shard": progress["shards"], f"{scope}/sequences": progress["sequences"],
                             f"{scope}/fraction": progress["shards"] / max(1, progress["of"]),
                             f"{scope}/sequences_per_s_so_far": progress["sequences"] / elapsed})
            advance(1)
            if on_shard is not None:
                on_shard(shard.shard_id, ctx.executor.worker_pids())

        arguments = (*arguments, queries)
        if score_mode(cfg) == "modules":  # one group call per shard: the ranks share it; a dead rank's shard re-runs
            for shard in todo:
                per_rank = ctx.executor.map(score_shard, shard, *arguments, cfg=cfg,
                                            what=f"scoring shard {shard.shard_id}")
                record(shard, {**per_rank[0], "num_forwards": sum(r["num_forwards"] for r in per_rank),
                               "direction_bytes": [b for r in per_rank for b in r["direction_bytes"]]})
        else:
            ctx.executor.map_shards(score_shard, todo, *arguments, cfg=cfg, what="scoring", on_result=record)
    return manifest
