"""The query stage: ∇θ f(z_q) on the completion tokens of every query (seeds §1), saved per module in queries/.

Every rank runs every query batch (under ZeRO-3 each forward gathers the parameters layer by layer, a collective)
and captures every tracked module, but forms and keeps the gradients of the modules it owns only (`ownership`):
each rank writes its shard `gradients-<rank>.safetensors`, meta.json maps every module to its shard, and nothing
parameter-sized reaches the driver.
"""

from __future__ import annotations

from pathlib import Path

from distributed_astra.artifacts import atomic_path, rank_file, save_tensors, write_json
from distributed_astra.context import QUERY_GRADIENTS_STEM, Context, query_meta
from distributed_astra.curvature.covariance import STAT_DTYPES, batch_to_device
from distributed_astra.data.sequences import iter_query_batches, load_queries
from distributed_astra.execution import Rank
from distributed_astra.ihvp.products import vec_nbytes
from distributed_astra.ihvp.solvers import state_storage
from distributed_astra.ownership import owned, run_owners
from distributed_astra.progress import progress_bar
from distributed_astra.scoring.gradients import query_gradients
from distributed_astra.tracking import metered


def rank_query(rank: Rank, queries_path: str, folder: str) -> dict:
    """This rank's owned modules' gradients {module: [Q, out, in+1]} in `solver.state_dtype`'s storage, in the
    queries file's order, written to `folder`/gradients-<rank>.safetensors: {files {module: shard}, tokens,
    resident_bytes}."""
    cfg = rank.cfg
    shapes = {n: t.shape for n, t in rank.tracked.items()}
    mine = owned(run_owners(cfg, shapes, rank.world_size), rank.rank)
    tokens = [0]
    queries = load_queries(queries_path)

    def batches():
        for batch in iter_query_batches(queries, rank.tokenizer, cfg.solver.query_forward_batch):
            tokens[0] += int(batch["attention_mask"].sum())
            yield batch_to_device(batch, rank.device)

    stat = STAT_DTYPES[cfg.factors.dtype]
    _, grads = query_gradients(rank.model, rank.tracked, batches(), stat, on_batch=lambda n: rank.advance("queries", n),
                               keep=mine, num_queries=len(queries), store=state_storage(cfg.solver, stat))
    file = rank_file(QUERY_GRADIENTS_STEM, rank.rank)
    if grads:
        save_tensors({n: g.cpu() for n, g in grads.items()}, Path(folder) / file)
    return {"files": {n: file for n in grads}, "tokens": tokens[0],
            "resident_bytes": vec_nbytes(grads)}


@metered("query")
def query(ctx: Context) -> None:
    """queries/: each rank's gradient shard and meta.json (the query ids as given, the module → shard map),
    atomically; logs query/max_rank_gradient_bytes."""
    ids = [q.query_id for q in load_queries(ctx.queries)]
    with atomic_path(ctx.paths.queries) as tmp:
        tmp.mkdir()
        with progress_bar("query gradients", len(ids), "queries") as advance:
            per_rank = ctx.executor.map(rank_query, str(ctx.queries), str(tmp), cfg=ctx.cfg, what="query gradients",
                                        progress=lambda unit, n: advance(n))
        files = {n: f for out in per_rank for n, f in out["files"].items()}
        ctx.tracker.count(sequences=len(ids), tokens=per_rank[0]["tokens"])
        ctx.tracker.log({"query/max_rank_gradient_bytes": max(out["resident_bytes"] for out in per_rank)})
        write_json(tmp / "meta.json", {**query_meta(ctx), "num_queries": len(ids), "query_ids": ids,
                                       "files": {n: files[n] for n in ctx.tracked}})
