"""The fit stage: EK-FAC factors on every rank of the executor (seeds §3), the curvature/ code doing all the math.

On every rank (one `rank_fit` call; one rank in process):

1. Covariance pass. The corpus is streamed in corpus order (`factors.batch_size`); batch i is processed by rank
   i mod N (`RankBatches`), which also advances the label generator past the other ranks' batches, so each sequence
   gets the label it gets on one rank. A and S sums and the token/sequence counts are all-reduced.
2. Eigendecompositions, sharded by module: module m is decomposed by the rank chosen by `balance_by_cost` (cost
   d_A³ + d_S³, largest first onto the least-loaded rank), then broadcast from that rank, module by module.
3. Eigenvalue-correction pass: the same batch assignment (the generator continues where one rank's would be),
   Λ sums and counts all-reduced.

SOURCE's segment factors (seeds §6.3, App. D.2) are the same passes over each checkpoint of the segment in turn:
sums over checkpoints divided by the total counts are the means over checkpoints, one eigenbasis for all.

Rank 0 returns the factors; the driver saves them once. N ranks equal one rank up to float64 summation order
(asserted at rel 1e-5 in the tests).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from distributed_astra.context import Context, factor_meta, log_rank_memory, note_skipped_rows
from distributed_astra.curvature.covariance import STAT_DTYPES, CovarianceStats, collect_covariances, model_device
from distributed_astra.curvature.eigen import (
    KroneckerEigen,
    LambdaStats,
    collect_eigenvalue_correction,
    eigendecompose_module,
)
from distributed_astra.curvature.factors import EkfacFactors, build_factors, save_factors
from distributed_astra.data.corpus import CorpusStats
from distributed_astra.distributed.collectives import (
    RankBatches,
    all_reduce_counts,
    all_reduce_sum,
    balance_by_cost,
    broadcast_tensors,
)
from distributed_astra.errors import DastraError
from distributed_astra.execution import Rank
from distributed_astra.ihvp.ekfac import mean_eigenvalue
from distributed_astra.progress import console, progress_bar
from distributed_astra.source.trajectory import load_trajectory, weights
from distributed_astra.tracking import metered

PASSES = ("covariance", "lambda")


def _merge_covariances(local: CovarianceStats) -> CovarianceStats:
    named = {**{f"a/{n}": t for n, t in local.a_sum.items()}, **{f"s/{n}": t for n, t in local.s_sum.items()}}
    sums = all_reduce_sum(named)
    tokens, sequences = all_reduce_counts(local.num_tokens, local.num_sequences)
    return CovarianceStats(
        {n: sums[f"a/{n}"] for n in local.a_sum}, {n: sums[f"s/{n}"] for n in local.s_sum}, tokens, sequences
    )


def sharded_eigendecompose(rank: Rank, cov: CovarianceStats) -> tuple[dict[str, KroneckerEigen], dict[str, int]]:
    """Every module's eigenbases on every rank: each module decomposed on one rank (balanced by d³), then broadcast."""
    costs = {n: float(t.in_dim) ** 3 + float(t.out_features) ** 3 for n, t in rank.tracked.items()}
    owner = balance_by_cost(costs, rank.world_size)
    eigens: dict[str, KroneckerEigen] = {}
    for name, tm in rank.tracked.items():  # model order: the same broadcast sequence on every rank
        if owner[name] == rank.rank:
            eig = eigendecompose_module(cov.covariance_a(name), cov.covariance_s(name))
        else:
            dtype, device = cov.a_sum[name].dtype, cov.a_sum[name].device
            eig = KroneckerEigen(
                torch.empty(tm.in_dim, dtype=dtype, device=device),
                torch.empty(tm.in_dim, tm.in_dim, dtype=dtype, device=device),
                torch.empty(tm.out_features, dtype=dtype, device=device),
                torch.empty(tm.out_features, tm.out_features, dtype=dtype, device=device),
            )
        broadcast_tensors([eig.eigval_a, eig.q_a, eig.eigval_s, eig.q_s], src=owner[name])
        eigens[name] = eig
    return eigens, owner


def rank_fit(rank: Rank, corpus: str, trajectory: str | None = None, checkpoints: Sequence[int] = ()) -> dict | None:
    """Both passes on this rank's batches, merged over ranks; over each of `checkpoints` of `trajectory` in turn
    (SOURCE) or at the model's own weights. Rank 0 returns {factors, owners, batches, skipped rows}."""
    cfg = rank.cfg.factors
    dtype = STAT_DTYPES[cfg.dtype]
    generator = torch.Generator(device=model_device(rank.model)).manual_seed(cfg.seed)
    traj = load_trajectory(trajectory) if trajectory is not None else None
    states = [traj.state(i) for i in checkpoints] if traj is not None else [None]
    stats = CorpusStats()

    def batches(part: str) -> RankBatches:
        counted = stats if part == PASSES[0] and not stats.rows else None  # the first pass counts skipped rows
        return RankBatches(
            rank.training_batches(corpus, cfg.batch_size, cfg.max_sequences, stats=counted),
            rank.rank, rank.world_size, generator,
        )

    local_cov: CovarianceStats | None = None
    for state in states:
        with weights(rank.model, state):
            stream = batches(PASSES[0])
            part = collect_covariances(
                rank.model, rank.tracked, stream, dtype, generator, lambda rows: rank.advance(PASSES[0], rows)
            )
            stream.restore()
        local_cov = part if local_cov is None else local_cov + part
    cov = _merge_covariances(local_cov)
    if cov.num_sequences == 0:  # the same merged count on every rank: all stop here, no collective is left waiting
        return {"factors": None, "skipped": (stats.skipped_empty, stats.skipped_non_utf8)} if rank.rank == 0 else None
    eigens, owner = sharded_eigendecompose(rank, cov)

    local_lam: LambdaStats | None = None
    for state in states:
        with weights(rank.model, state):
            stream = batches(PASSES[1])
            part = collect_eigenvalue_correction(
                rank.model, rank.tracked, eigens, stream, dtype, generator, lambda rows: rank.advance(PASSES[1], rows)
            )
            stream.restore()
        local_lam = part if local_lam is None else local_lam + part
    sums = all_reduce_sum(local_lam.lambda_sum)
    (sequences,) = all_reduce_counts(local_lam.num_sequences)
    factors = build_factors(cov, eigens, LambdaStats(sums, sequences))
    if rank.rank != 0:
        return None
    return {
        "factors": factors.to("cpu"), "eigen_owner": owner, "num_batches": stream.num_batches,
        "skipped": (stats.skipped_empty, stats.skipped_non_utf8),
    }


def fit_factors(ctx: Context, label: str, trajectory: str | None = None, checkpoints: Sequence[int] = ()
                ) -> tuple[EkfacFactors, dict]:
    """`rank_fit` on the context's executor with a live progress bar (in process) and the fit's W&B progress;
    raises when the corpus yields no sequence."""
    cfg = ctx.cfg.factors
    rows = ctx.open_corpus().num_rows
    total = min(rows, cfg.max_sequences) if cfg.max_sequences is not None else rows
    passes = max(1, len(checkpoints))
    with progress_bar(label, 2 * passes * total, "seq") as advance:
        log = ctx.tracker.progress("fit", passes * total)
        out = ctx.executor.map(
            rank_fit, str(ctx.corpus), trajectory, tuple(checkpoints), cfg=ctx.cfg, what="fit",
            progress=lambda part, n: (advance(n), log(part, n)),
        )[0]
    note_skipped_rows(ctx, *out["skipped"])
    factors: EkfacFactors | None = out["factors"]
    if factors is None:
        raise DastraError(f"data.corpus '{ctx.corpus}' yields no token sequences; give it non-empty documents")
    return factors, out


@metered("fit")
def fit(ctx: Context) -> EkfacFactors:
    """Two passes over the corpus: covariances A, S, then the eigenvalue correction Λ (seeds §3); saved once."""
    started = time.perf_counter()
    factors, out = fit_factors(ctx, "fit EK-FAC (2 passes)")
    console.print(
        f"[cyan]note:[/] fit on {ctx.executor.world_size} rank(s) (ZeRO stage {ctx.executor.stage}): "
        f"{out['num_batches']} batches, {factors.num_sequences} sequences, {time.perf_counter() - started:.1f} s",
        highlight=False,
    )
    meta = {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype, "versions": ctx.versions()}
    save_factors(factors, ctx.paths.factors, meta)
    ctx.tracker.log({
        "fit/num_sequences": factors.num_sequences, "fit/mean_lambda": mean_eigenvalue(factors),
        "fit/num_ranks": ctx.executor.world_size, "fit/num_batches": out["num_batches"],
    })
    ctx.tracker.count(tokens=2 * factors.num_tokens, sequences=2 * factors.num_sequences)  # both passes, all ranks
    log_rank_memory(ctx, "fit")
    return factors
