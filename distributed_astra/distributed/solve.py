"""Parallel iHVP solves (seeds §4-5) on N ranks; `ihvp.solve` does every iteration, unchanged.

The single-process solve cuts the queries into chunks of `solver.query_batch_size` and runs each chunk with one
seeded generator shared by the minibatch sampler (and the Fisher product's labels), chunk after chunk. Both modes
reproduce that stream exactly, so their directions equal the single-process ones:

* mode `queries` (replicated model, exact `GGNProduct`; no communication in the iterations): every rank draws the
  same minibatches; the queries of each chunk are split across ranks (`slice_bounds`), and a rank's part is cut
  again into pieces that fit its free memory (`memory_query_chunk`), each piece started from the chunk's generator
  state. A query's iterates depend only on itself and the shared minibatches, so any split gives the same x.
  After a chunk, the ranks agree on the longest run (all-reduce max of minibatches drawn) and fast-forward to it,
  where one process would be. (One exception: LiSSA with several repeats, when some queries of a chunk stop early
  in a repeat (divergence, `solver.tolerance`), starts their piece's next repeat earlier in the stream than one
  process would; the estimate is as valid, its minibatches differ.)
* mode `data` (ZeRO-3 or replicated; `FisherProduct` under ZeRO-3, the GGN where parameters are whole): every rank
  runs every chunk; the sampler draws the same minibatch on every rank, and rank r takes the fixed contiguous slice
  `slice_bounds(B, N, r)` of it (`SlicedProduct`). Each rank computes Σ_{n in slice} J_nᵀ H_n J_n v and its count of
  loss-carrying rows; both are all-reduced, so the product is the sum of the slice products divided by N_B: the
  minibatch mean of one process. For the Fisher product, rank r advances the label generator past the rows before
  and after its slice, so its rows get the labels one process would draw.

The held-out evaluation (`solver.heldout_every`, ihvp/solvers.py) runs in both modes: every rank draws the same
fixed batch from its sampler's pool with the held-out generator (seed + 1), outside the minibatch stream. In mode
`data` it is sliced like the minibatches, so it holds at least `ray.num_workers` rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import psutil
import torch

from distributed_astra.curvature.factors import EkfacFactors
from distributed_astra.distributed.collectives import (
    advance_label_stream,
    all_reduce_counts,
    all_reduce_sum,
    label_draws,
    slice_bounds,
)
from distributed_astra.distributed.fit import training_batches
from distributed_astra.distributed.worker_group import RankState
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.products import Batch, CurvatureProduct, FisherProduct, GGNProduct, Vectors, label_generator
from distributed_astra.ihvp.solvers import LIVE_VECTORS_PER_QUERY, MinibatchSampler, ekfac_preconditioner, solve


class SlicedProduct(CurvatureProduct):
    """G̃_B·v where this rank computes its slice of every minibatch and the sums are all-reduced (mode `data`).

    `inner` must be a one-sample product (`FisherProduct(num_samples=1)` or `GGNProduct`); `label_samples` > 1
    repeats it like `FisherProduct(num_samples=S)` does, advancing `generator` around the slice each time.
    """

    def __init__(
        self, inner: CurvatureProduct, rank: int, world_size: int, label_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.inner = inner
        self.tracked = inner.tracked
        self.rank = rank
        self.world_size = world_size
        self.label_samples = label_samples
        self.generator = generator

    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        rows = int(batch["input_ids"].shape[0])
        if rows < self.world_size:
            raise DastraError(
                f"solver.minibatch_size ({rows}) is smaller than ray.num_workers ({self.world_size}): every rank "
                "needs a slice of each minibatch; raise solver.minibatch_size or use ray.solve_mode=queries"
            )
        start, stop = slice_bounds(rows, self.world_size, self.rank)
        part = {k: (t[start:stop] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == rows else t)
                for k, t in batch.items()}
        per_row = label_draws(batch) // rows
        total: Vectors | None = None
        count = 0
        for _ in range(self.label_samples):
            advance_label_stream(self.generator, start * per_row)
            partial, count = self.inner.product_sum(vectors, part)
            advance_label_stream(self.generator, (rows - stop) * per_row)
            total = partial if total is None else {n: total[n] + t for n, t in partial.items()}
        total = {n: t / self.label_samples for n, t in total.items()}
        summed = all_reduce_sum(total)
        (count,) = all_reduce_counts(count)
        return summed, count


class CountingSampler:
    """The minibatch iterator handed to `solve`: the shared sampler, counting the minibatches drawn."""

    def __init__(self, sampler: MinibatchSampler) -> None:
        self.sampler = sampler
        self.drawn = 0

    def __iter__(self) -> CountingSampler:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.drawn += 1
        return self.sampler.sample()


def fast_forward(sampler: MinibatchSampler, draws: int, label_samples: int, generator: torch.Generator | None) -> None:
    """Draw `draws` minibatches (and, for the Fisher product, their label uniforms) as the iterations would."""
    for _ in range(draws):
        batch = sampler.sample()
        advance_label_stream(generator, label_samples * label_draws(batch))


def memory_query_chunk(tracked: Mapping, dtype: torch.dtype, device: torch.device) -> int:
    """Queries one rank can iterate at once: half its free memory over LIVE_VECTORS_PER_QUERY direction-sized tensors."""
    elements = sum(t.out_features * t.in_dim for t in tracked.values())
    per_query = LIVE_VECTORS_PER_QUERY * elements * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return max(1, int(0.5 * free) // per_query)


def rank_solve(
    state: RankState, corpus: str, factors: EkfacFactors, grads: dict[str, torch.Tensor], damping: float, mode: str
) -> list[dict]:
    """Solve every chunk's share of this rank; returns one record per piece solved here (only rank 0 in mode data)."""
    cfg = state.cfg.solver
    preconditioner = ekfac_preconditioner(factors, cfg, damping, state.cfg.factors.strategy)
    generator = torch.Generator().manual_seed(cfg.seed)  # minibatch indices, as context.curvature_minibatches
    label_samples = cfg.fisher_samples if cfg.product == "fisher" else 1
    labels = label_generator(state.model, cfg.seed) if cfg.product == "fisher" else None
    product: CurvatureProduct | None = None
    sampler: MinibatchSampler | None = None
    if cfg.name != "ekfac":  # the iterative solvers need G̃·v on minibatches of the corpus
        product = GGNProduct(state.model, state.tracked) if labels is None else FisherProduct(
            state.model, state.tracked, 1, labels
        )
        if mode == "data":
            product = SlicedProduct(product, state.rank, state.world_size, label_samples, labels)
        sampler = MinibatchSampler(
            training_batches(state, corpus, state.cfg.factors.batch_size, state.cfg.factors.max_sequences),
            cfg.minibatch_size, generator,
        )
    heldout = None
    if sampler is not None and cfg.heldout_every > 0:  # context.heldout_batch, sliced in mode data
        size = max(cfg.heldout_batch_size, state.world_size) if mode == "data" else cfg.heldout_batch_size
        heldout = sampler.draw(size, torch.Generator().manual_seed(cfg.seed + 1))
    num_queries = next(iter(grads.values())).shape[0]
    records: list[dict] = []
    piece = memory_query_chunk(state.tracked, next(iter(grads.values())).dtype, state.device)
    for chunk_start in range(0, num_queries, cfg.query_batch_size):
        chunk_stop = min(chunk_start + cfg.query_batch_size, num_queries)
        if mode == "data":
            parts = [(chunk_start, chunk_stop)]
        else:
            lo, hi = slice_bounds(chunk_stop - chunk_start, state.world_size, state.rank)
            parts = [(chunk_start + s, min(chunk_start + s + piece, chunk_start + hi)) for s in range(lo, hi, piece)]
        start_state = generator.get_state()
        label_state = labels.get_state() if labels is not None else None
        longest = 0
        for lo, hi in parts:
            generator.set_state(start_state)
            if labels is not None:
                labels.set_state(label_state)
            counting = CountingSampler(sampler) if sampler is not None else None
            started = time.perf_counter()
            result = solve(
                {n: g[lo:hi] for n, g in grads.items()}, preconditioner, product, counting, cfg, damping,
                query_ids=[str(q) for q in range(lo, hi)], heldout=heldout,
            )
            seconds = time.perf_counter() - started
            longest = max(longest, counting.drawn if counting is not None else 0)
            if mode == "queries" or state.rank == 0:
                records.append({
                    "start": lo, "stop": hi, "chunk_start": chunk_start, "x": result.x, "status": result.status,
                    "iterations": result.iterations, "messages": result.messages, "trace": result.trace.columns(),
                    "heldout": result.heldout.columns(), "heldout_seconds": result.heldout_seconds,
                    "seconds": seconds, "heldout_batch_size": 0 if heldout is None else int(heldout["input_ids"].shape[0]),
                })
        if mode == "queries" and cfg.name != "ekfac":
            generator.set_state(start_state)
            if labels is not None:
                labels.set_state(label_state)
            (longest,) = all_reduce_counts(longest, op=torch.distributed.ReduceOp.MAX)
            fast_forward(sampler, longest, label_samples, labels)
    return records
