"""The fit stage: EK-FAC factors on every rank of the executor (seeds §3), the curvature/ code doing all the math;
each module's factors live on, and are written by, the rank that owns it (ownership.py).

On every rank (one `rank_fit` call; one rank in process):

1. Covariance pass. The corpus is streamed in corpus order (`factors.batch_size`); batch i is processed by rank
   i mod N (`RankBatches`), which also advances the label generator past the other ranks' batches, so each sequence
   gets the label it gets on one rank. For every tracked module, every batch's ā and Ds reach the module's owner
   (`owner_route`), which alone accumulates its A and S sums; token and sequence counts are all-reduced.
2. Eigendecompositions: each owner decomposes its own modules; nothing is broadcast.
3. Eigenvalue-correction pass: the same batch assignment (the generator continues where one rank's would be), ā and
   Ds routed to the owners again, each owner accumulating Λ of its modules; counts all-reduced.
4. Each owner writes its modules into the factors folder being assembled (`save_factor_shard`); the driver writes
   `meta.json` and moves the folder into place, so a folder has every shard or none.

No rank holds the factors (or the statistics) of a module it does not own. Communication per batch: each
non-owner sends B·T·(out + in+1) numbers per module to the owner, once per pass.

SOURCE's segment factors (seeds §6.3, App. D.2) are the same passes over each checkpoint of the segment in turn:
sums over checkpoints divided by the total counts are the means over checkpoints, one eigenbasis for all.

N ranks equal one rank up to float64 summation order (asserted at rel 1e-5 in the tests).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from distributed_astra.artifacts import atomic_path
from distributed_astra.context import Context, factor_meta, log_rank_memory, note_skipped_rows
from distributed_astra.curvature.covariance import STAT_DTYPES, CovarianceStats, collect_covariances, model_device
from distributed_astra.curvature.eigen import LambdaStats, collect_eigenvalue_correction, eigendecompose
from distributed_astra.curvature.factors import build_factors, mean_from_sums, save_factor_shard, write_factors_meta
from distributed_astra.data.corpus import CorpusStats
from distributed_astra.distributed.collectives import RankBatches, all_reduce_counts, owner_route, sent_bytes
from distributed_astra.errors import DastraError
from distributed_astra.execution import Rank
from distributed_astra.ownership import owned, run_owners
from distributed_astra.progress import console, progress_bar
from distributed_astra.source.trajectory import load_trajectory, weights
from distributed_astra.tracking import metered

PASSES = ("covariance", "lambda")


def rank_fit(
    rank: Rank, corpus: str, folder: str, trajectory: str | None = None, checkpoints: Sequence[int] = ()
) -> dict:
    """Both passes on this rank's batches, each module's statistics on its owner; over each of `checkpoints` of
    `trajectory` in turn (SOURCE) or at the model's own weights. Writes this rank's modules into `folder`; returns
    {files, eigenvalue sums, resident bytes, the merged counts (None when the corpus had no sequence), batches,
    skipped rows, the bytes this rank sent through collectives}."""
    sent_before = sum(sent_bytes().values())
    cfg = rank.cfg.factors
    dtype = STAT_DTYPES[cfg.dtype]
    generator = torch.Generator(device=model_device(rank.model)).manual_seed(cfg.seed)
    traj = load_trajectory(trajectory) if trajectory is not None else None
    states = [traj.state(i) for i in checkpoints] if traj is not None else [None]
    owners = run_owners(rank.cfg, {n: t.shape for n, t in rank.tracked.items()}, rank.world_size)
    mine = owned(owners, rank.rank)
    route = owner_route(owners)
    stats = CorpusStats()

    def batches(part: str) -> RankBatches:
        counted = stats if part == PASSES[0] and not stats.rows else None  # the first pass counts skipped rows
        return RankBatches(
            rank.training_batches(corpus, cfg.batch_size, cfg.max_sequences, stats=counted),
            rank.rank, rank.world_size, generator,
        )

    cov: CovarianceStats | None = None
    for state in states:
        with weights(rank.model, state):
            stream = batches(PASSES[0])
            part = collect_covariances(
                rank.model, rank.tracked, stream, dtype, generator, lambda rows: rank.advance(PASSES[0], rows),
                owned=mine, route=route,
            )
            stream.restore()
        cov = part if cov is None else cov + part
    cov.num_tokens, cov.num_sequences = all_reduce_counts(cov.num_tokens, cov.num_sequences)
    skipped = (stats.skipped_empty, stats.skipped_non_utf8)
    if cov.num_sequences == 0:  # the same merged count on every rank: all stop here, no collective is left waiting
        return {"counts": None, "skipped": skipped, "files": {}}
    eigens = eigendecompose(cov, mine)
    cov.a_sum.clear(), cov.s_sum.clear()  # the owner's sums are its eigenbases now

    lam: LambdaStats | None = None
    for state in states:
        with weights(rank.model, state):
            stream = batches(PASSES[1])
            part = collect_eigenvalue_correction(
                rank.model, rank.tracked, eigens, stream, dtype, generator, lambda rows: rank.advance(PASSES[1], rows),
                route=route,
            )
            stream.restore()
        lam = part if lam is None else lam + part
    (lam.num_sequences,) = all_reduce_counts(lam.num_sequences)
    factors = build_factors(cov, eigens, lam)
    counts = (cov.num_tokens, cov.num_sequences, lam.num_sequences)
    return {
        "files": save_factor_shard(factors.modules, folder, rank.rank),
        "lambda_sum": factors.eigenvalue_sum(),
        "resident_bytes": sum(f.nbytes for f in factors.modules.values()),
        "counts": counts, "num_batches": stream.num_batches, "skipped": skipped,
        "sent_bytes": sum(sent_bytes().values()) - sent_before,
    }


def fit_factors(
    ctx: Context, label: str, out_dir: Path, meta: dict, trajectory: str | None = None,
    checkpoints: Sequence[int] = (),
) -> dict:
    """`rank_fit` on the context's executor with a live progress bar (in process) and the fit's W&B progress; the
    owners' shards and `meta.json` moved into `out_dir` at once. Returns {counts, num_batches, mean Λ,
    per-rank resident factor bytes}; raises when the corpus yields no sequence (nothing is written)."""
    cfg = ctx.cfg.factors
    rows = ctx.open_corpus().num_rows
    total = min(rows, cfg.max_sequences) if cfg.max_sequences is not None else rows
    passes = max(1, len(checkpoints))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with progress_bar(label, 2 * passes * total, "seq") as advance:
            log = ctx.tracker.progress("fit", passes * total)
            outs = ctx.executor.map(
                rank_fit, str(ctx.corpus), str(tmp), trajectory, tuple(checkpoints), cfg=ctx.cfg, what="fit",
                progress=lambda part, n: (advance(n), log(part, n)),
            )
        note_skipped_rows(ctx, *outs[0]["skipped"])
        if outs[0]["counts"] is None:
            raise DastraError(f"data.corpus '{ctx.corpus}' yields no token sequences; give it non-empty documents")
        num_tokens, num_sequences, num_lambda = outs[0]["counts"]
        files = {m: f for out in outs for m, f in out["files"].items()}
        lambda_sum = tuple(map(sum, zip(*(out["lambda_sum"] for out in outs))))
        write_factors_meta(
            tmp, meta, files, {n: t.shape for n, t in ctx.tracked.items()}, STAT_DTYPES[cfg.dtype],
            num_tokens, num_sequences, num_lambda, lambda_sum,
        )
    return {
        "num_tokens": num_tokens, "num_sequences": num_sequences, "num_batches": outs[0]["num_batches"],
        "mean_lambda": mean_from_sums(*lambda_sum),
        "resident_bytes": [out["resident_bytes"] for out in outs],
        "sent_bytes": [out["sent_bytes"] for out in outs],
    }


@metered("fit")
def fit(ctx: Context) -> dict:
    """Two passes over the corpus: covariances A, S, then the eigenvalue correction Λ (seeds §3); saved by the
    modules' owners (ownership.py)."""
    started = time.perf_counter()
    meta = {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype, "versions": ctx.versions()}
    out = fit_factors(ctx, "fit EK-FAC (2 passes)", ctx.paths.factors, meta)
    console.print(
        f"[cyan]note:[/] fit on {ctx.executor.world_size} rank(s) (ZeRO stage {ctx.executor.stage}): "
        f"{out['num_batches']} batches, {out['num_sequences']} sequences, {time.perf_counter() - started:.1f} s",
        highlight=False,
    )
    ctx.tracker.log({
        "fit/num_sequences": out["num_sequences"], "fit/mean_lambda": out["mean_lambda"],
        "fit/num_ranks": ctx.executor.world_size, "fit/num_batches": out["num_batches"],
        "fit/max_rank_factor_bytes": max(out["resident_bytes"]), "fit/max_rank_sent_bytes": max(out["sent_bytes"]),
    })
    ctx.tracker.count(tokens=2 * out["num_tokens"], sequences=2 * out["num_sequences"])  # both passes, all ranks
    log_rank_memory(ctx, "fit")
    return out
