"""The query stage: ∇θ f(z_q) on the completion tokens of every query (seeds §1), saved per module in queries/.

The gradients are computed on the executor's ranks from the model they hold (under ZeRO-3 each forward gathers the
parameters layer by layer, a collective, so every rank runs every query batch); rank 0 returns them.
"""

from __future__ import annotations

from distributed_astra.artifacts import atomic_path, save_tensors, write_json
from distributed_astra.context import QUERY_GRADIENTS_FILE, Context, query_meta
from distributed_astra.curvature.covariance import STAT_DTYPES, batch_to_device
from distributed_astra.data.sequences import iter_query_batches, load_queries
from distributed_astra.execution import Rank
from distributed_astra.progress import progress_bar
from distributed_astra.scoring.gradients import query_gradients
from distributed_astra.tracking import metered


def rank_query(rank: Rank, queries_path: str) -> dict | None:
    """Rank 0: {gradients {module: [Q, out, in+1]} in the queries file's order, tokens}; None on the others."""
    cfg = rank.cfg
    tokens = [0]

    def batches():
        for batch in iter_query_batches(load_queries(queries_path), rank.tokenizer, cfg.solver.query_batch_size):
            tokens[0] += int(batch["attention_mask"].sum())
            yield batch_to_device(batch, rank.device)

    _, grads = query_gradients(rank.model, rank.tracked, batches(), STAT_DTYPES[cfg.factors.dtype],
                               on_batch=lambda n: rank.advance("queries", n))
    return {"gradients": {name: g.cpu() for name, g in grads.items()}, "tokens": tokens[0]} if rank.rank == 0 else None


@metered("query")
def query(ctx: Context) -> None:
    """queries/: the gradients and meta.json (the query ids as given), atomically."""
    ids = [q.query_id for q in load_queries(ctx.queries)]
    with progress_bar("query gradients", len(ids), "queries") as advance:
        out = ctx.executor.map(rank_query, str(ctx.queries), cfg=ctx.cfg, what="query gradients",
                               progress=lambda unit, n: advance(n))[0]
    grads = out["gradients"]
    ctx.tracker.count(sequences=len(ids), tokens=out["tokens"])
    with atomic_path(ctx.paths.queries) as tmp:
        tmp.mkdir()
        save_tensors(grads, tmp / QUERY_GRADIENTS_FILE)
        write_json(tmp / "meta.json", {**query_meta(ctx), "num_queries": len(ids), "query_ids": ids})
