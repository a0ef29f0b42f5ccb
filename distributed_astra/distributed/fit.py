"""EK-FAC fit on N ranks (seeds §3), with the single-process code of `curvature/` doing all the math.

On every rank (one `rank_fit` call):

1. Covariance pass. The corpus is streamed in the single-process batch order (`factors.batch_size`); batch i is
   processed by rank i mod N (`RankBatches`), which also advances the label generator past the other ranks' batches,
   so each sequence gets the label it gets in one process. A and S sums and the token/sequence counts are
   all-reduced.
2. Eigendecompositions, sharded by module: module m is decomposed by the rank chosen by `balance_by_cost` (cost
   d_A³ + d_S³, largest first onto the least-loaded rank), then broadcast from that rank, module by module, so every
   rank ends with every eigenbasis.
3. Eigenvalue-correction pass: the same batch assignment (the generator continues where one process's would be),
   Λ sums and counts all-reduced.

Rank 0 returns the factors; the driver saves them once with `save_factors` and the single-process metadata. The
result equals the single-process fit up to float64 summation order (asserted at rel 1e-5 in the tests).
"""

from __future__ import annotations

import torch

from distributed_astra.curvature.covariance import STAT_DTYPES, CovarianceStats, collect_covariances, model_device
from distributed_astra.curvature.eigen import (
    KroneckerEigen,
    LambdaStats,
    collect_eigenvalue_correction,
    eigendecompose_module,
)
from distributed_astra.curvature.factors import EkfacFactors, build_factors
from distributed_astra.data.corpus import open_corpus
from distributed_astra.data.sequences import SequenceFormat, iter_training_batches
from distributed_astra.distributed.collectives import (
    RankBatches,
    all_reduce_counts,
    all_reduce_sum,
    balance_by_cost,
    broadcast_tensors,
)
from distributed_astra.distributed.worker_group import RankState


def training_batches(state: RankState, corpus: str, batch_size: int, max_sequences: int | None):
    """The corpus's training batches in the single-process order (what `context.Context.training_batches` gives)."""
    data = state.cfg.data
    return iter_training_batches(
        open_corpus(corpus, data.text_column, data.id_column, data.split), state.tokenizer,
        SequenceFormat.from_data(data), batch_size, max_sequences=max_sequences,
    )


def _merge_covariances(local: CovarianceStats) -> CovarianceStats:
    named = {**{f"a/{n}": t for n, t in local.a_sum.items()}, **{f"s/{n}": t for n, t in local.s_sum.items()}}
    sums = all_reduce_sum(named)
    tokens, sequences = all_reduce_counts(local.num_tokens, local.num_sequences)
    return CovarianceStats(
        {n: sums[f"a/{n}"] for n in local.a_sum}, {n: sums[f"s/{n}"] for n in local.s_sum}, tokens, sequences
    )


def sharded_eigendecompose(state: RankState, cov: CovarianceStats) -> tuple[dict[str, KroneckerEigen], dict[str, int]]:
    """Every module's eigenbases on every rank: each module decomposed on one rank (balanced by d³), then broadcast."""
    costs = {n: float(t.in_dim) ** 3 + float(t.out_features) ** 3 for n, t in state.tracked.items()}
    owner = balance_by_cost(costs, state.world_size)
    eigens: dict[str, KroneckerEigen] = {}
    for name, tm in state.tracked.items():  # model order: the same broadcast sequence on every rank
        if owner[name] == state.rank:
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


def rank_fit(state: RankState, corpus: str) -> dict | None:
    """Both passes on this rank's batches, merged over ranks. Rank 0 returns {factors, owners, batches}."""
    cfg = state.cfg.factors
    dtype = STAT_DTYPES[cfg.dtype]
    generator = torch.Generator(device=model_device(state.model)).manual_seed(cfg.seed)

    covariance_batches = RankBatches(
        training_batches(state, corpus, cfg.batch_size, cfg.max_sequences), state.rank, state.world_size, generator
    )
    local_cov = collect_covariances(state.model, state.tracked, covariance_batches, dtype, generator)
    covariance_batches.restore()
    cov = _merge_covariances(local_cov)
    eigens, owner = sharded_eigendecompose(state, cov)

    lambda_batches = RankBatches(
        training_batches(state, corpus, cfg.batch_size, cfg.max_sequences), state.rank, state.world_size, generator
    )
    local_lam = collect_eigenvalue_correction(state.model, state.tracked, eigens, lambda_batches, dtype, generator)
    lambda_batches.restore()
    sums = all_reduce_sum(local_lam.lambda_sum)
    (sequences,) = all_reduce_counts(local_lam.num_sequences)
    factors: EkfacFactors = build_factors(cov, eigens, LambdaStats(sums, sequences))
    if state.rank != 0:
        return None
    return {
        "factors": factors.to("cpu"),
        "eigen_owner": owner,
        "num_batches": covariance_batches.num_batches,
        "local_batches": -(-covariance_batches.num_batches // state.world_size),
    }
