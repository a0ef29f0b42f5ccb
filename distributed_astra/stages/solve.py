"""The solve stage: (G + λI)⁻¹∇f for every query with the configured solver (seeds §3-5) on the executor's ranks;
`ihvp.solve` does every iteration, unchanged. SOURCE / ASTRA-SOURCE go to stages/source.py.

One rank cuts the queries into chunks of `solver.query_batch_size` and runs each chunk with one seeded generator
shared by the minibatch sampler (and the Fisher product's labels), chunk after chunk. N ranks reproduce that stream
exactly, so their directions equal one rank's, in either mode (`distributed.solve_mode`):

* mode `queries` (replicated model, exact `GGNProduct`; no communication in the iterations): every rank draws the
  same minibatches; the queries of each chunk are split across ranks (`slice_bounds`), and a rank's part is cut
  again into pieces that fit its free memory (`memory_query_chunk`), each piece started from the chunk's generator
  state. A query's iterates depend only on itself and the shared minibatches, so any split gives the same x.
  After a chunk, the ranks agree on the longest run (all-reduce max of minibatches drawn) and fast-forward the
  minibatch stream to it; the Fisher product's label stream takes the state the longest piece left (broadcast
  from its rank: a minibatch can cost several products, e.g. the step-size power iteration), where one process
  would be. (One exception: LiSSA with several repeats, when some queries of a chunk stop early in a repeat
  (divergence, `solver.tolerance`), starts their piece's next repeat earlier in the stream than one process would.)
  One rank with one piece per chunk is one process exactly: it just continues its streams.)
* mode `data` (ZeRO-3 or replicated; `FisherProduct` under ZeRO-3, the GGN where parameters are whole): every rank
  runs every chunk; the sampler draws the same minibatch on every rank, and rank r takes the fixed contiguous slice
  `slice_bounds(B, N, r)` of it (`SlicedProduct`). Each rank computes Σ_{n in slice} J_nᵀ H_n J_n v and its count of
  loss-carrying rows; both are all-reduced, so the product is the sum of the slice products divided by N_B: the
  minibatch mean of one process. For the Fisher product, rank r advances the label generator past the rows before
  and after its slice, so its rows get the labels one process would draw.

* mode `modules` (module ownership, ownership.py; replicated or ZeRO-3 with the Fisher product): each rank loads
  and holds only its modules' factors and query gradients, and keeps each query's v, x, momentum and product
  result for those modules only; the EK-FAC preconditioner is applied module by module where the module lives.
  Every rank runs every chunk and draws the same minibatch (as one process does); the product splits at a sum over
  modules (ihvp/products.py: the logit tangent J v for the GGN, the per-sequence coefficient for the Fisher), which
  is all-reduced, and every per-query scalar of the solver (h, residuals, power-iteration norms) is completed over
  the ranks (`ihvp.solvers.Sharding`), so every rank stops the same queries at the same iteration and the blocks
  equal one rank's. Per rank: the factors and the [Q, ·] state of ~1/N of D. With more ranks than tracked
  modules, a rank that owns none shadows the cheapest module: it computes that module like its owner (so it takes
  part in every forward and collective), adds zeros to every sum over ranks (`sum_over_other_ranks`) and returns
  no block of it.

The held-out evaluation (`solver.heldout_every`, ihvp/solvers.py) runs in every mode: every rank draws the same
fixed batch from its sampler's pool with the held-out generator (seed + 1), outside the minibatch stream. In mode
`data` it is sliced like the minibatches, so it holds at least `ray.num_workers` rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import pyarrow as pa
import torch

from distributed_astra.artifacts import check_meta
from distributed_astra.config import SOURCE_SOLVERS
from distributed_astra.context import (
    Context,
    factor_meta,
    heldout_meta,
    log_rank_memory,
    query_gradients_folder,
    read_query_gradients,
    run_damping,
    solver_logger,
    write_directions,
)
from distributed_astra.curvature.factors import EkfacFactors, load_factors, load_factors_meta
from distributed_astra.distributed import solve_mode
from distributed_astra.distributed.collectives import (
    advance_label_stream,
    all_reduce_counts,
    all_reduce_sum,
    broadcast_state,
    label_draws,
    sent_bytes,
    slice_bounds,
    sum_over_other_ranks,
    sum_over_ranks,
)
from distributed_astra.errors import DastraError
from distributed_astra.execution import Rank
from distributed_astra.ihvp.monitor import heldout_table, trace_table
from distributed_astra.ihvp.products import (
    Batch,
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    MicroBatchedProduct,
    Vectors,
    batch_rows,
    label_generator,
    on_this_rank,
    vec_nbytes,
)
from distributed_astra.ihvp.solvers import (
    LIVE_VECTORS_PER_QUERY,
    WHOLE,
    MinibatchSampler,
    Sharding,
    ekfac_preconditioner,
)
from distributed_astra.ihvp.solvers import solve as solve_ihvp
from distributed_astra.ownership import owned, run_costs, run_owners
from distributed_astra.progress import console, progress_bar
from distributed_astra.source.averaging import average_states
from distributed_astra.source.trajectory import load_trajectory, weights
from distributed_astra.tracking import metered


def owned_factors(factors: EkfacFactors | str, names: list[str], device: torch.device) -> EkfacFactors:
    """The factors of `names` on `device`: read from a factors folder (only those modules' tensors) or taken from
    factors in memory (SOURCE's segment factors)."""
    if isinstance(factors, str):
        return load_factors(factors, device=device, names=names)
    return EkfacFactors({n: factors[n].to(device) for n in names}, factors.num_tokens, factors.num_sequences,
                        factors.num_lambda_sequences)


def owned_gradients(grads: dict[str, torch.Tensor] | str, names: list[str], device: torch.device) -> Vectors:
    """The query gradients of `names` on `device`: read from the query stage's folder (only the shards holding
    those modules) or taken from a dict in memory."""
    if isinstance(grads, str):
        return read_query_gradients(Path(grads), names, device=str(device))
    return {n: grads[n].to(device) for n in names}


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
        self.owned = inner.owned
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
        part = batch_rows(batch, start, stop)
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
        self.drawn = self.sequences = self.tokens = 0

    def __iter__(self) -> CountingSampler:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.sampler.sample()
        self.drawn += 1
        self.sequences += int(batch["input_ids"].shape[0])
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def fast_forward(sampler: MinibatchSampler, draws: int) -> None:
    """Draw `draws` minibatches as the iterations would."""
    for _ in range(draws):
        sampler.sample()


def memory_query_chunk(tracked: Mapping, dtype: torch.dtype, device: torch.device) -> int:
    """Queries one rank can iterate at once: half its free memory over LIVE_VECTORS_PER_QUERY direction-sized
    tensors."""
    elements = sum(t.out_features * t.in_dim for t in tracked.values())
    per_query = LIVE_VECTORS_PER_QUERY * elements * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return max(1, int(0.5 * free) // per_query)


def rank_solve(
    rank: Rank, corpus: str, factors: EkfacFactors | str, grads: dict[str, torch.Tensor] | str, damping: float,
    mode: str, trajectory: str | None = None, checkpoints: Sequence[int] = (),
) -> list[dict]:
    """Solve every chunk's share of this rank; returns one record per piece solved here (only rank 0 in mode data;
    in mode modules every rank, with the blocks of its modules). `factors` and `grads` are in memory or the folder /
    file each rank reads its modules from. With `trajectory`, G̃ is taken at the mean weights of its `checkpoints`
    (ASTRA-SOURCE, seeds §7 option 3)."""
    state = average_states([t for t in map(load_trajectory(trajectory).state, checkpoints)]) if trajectory else None
    with weights(rank.model, state):
        return _rank_solve(rank, corpus, factors, grads, damping, mode)


def _rank_solve(
    rank: Rank, corpus: str, factors: EkfacFactors | str, grads: dict[str, torch.Tensor] | str, damping: float,
    mode: str,
) -> list[dict]:
    cfg = rank.cfg.solver
    shapes = {n: t.shape for n, t in rank.tracked.items()}
    split = mode == "modules"
    mine = owned(run_owners(rank.cfg, shapes, rank.world_size), rank.rank) if split else list(rank.tracked)
    shadow = split and not mine  # more ranks than modules: compute the cheapest module, count nothing of it
    if shadow:
        costs = run_costs(rank.cfg, shapes)
        mine = [min(costs, key=costs.get)]
    reduce = sum_over_other_ranks if shadow else sum_over_ranks
    # the solver state, the preconditioner and the products live on the rank
    factors = owned_factors(factors, mine, rank.device)
    grads = owned_gradients(grads, mine, rank.device)
    sharding = Sharding(reduce, shapes) if split else WHOLE
    preconditioner = ekfac_preconditioner(factors, cfg, damping, rank.cfg.factors.strategy)
    generator = torch.Generator().manual_seed(cfg.seed)  # minibatch indices
    label_samples = cfg.fisher_samples if cfg.product == "fisher" else 1
    labels = label_generator(rank.model, cfg.seed) if cfg.product == "fisher" else None
    product: CurvatureProduct | None = None
    sampler: MinibatchSampler | None = None
    if cfg.name != "ekfac":  # the iterative solvers need G̃·v on minibatches of the corpus
        combine = reduce if split else on_this_rank
        micro = cfg.micro_batch_size
        # one label sample per call where a wrapper repeats the samples: SlicedProduct around the slice (mode
        # data), MicroBatchedProduct over the micro-batches
        inner_samples = 1 if mode == "data" or micro is not None else label_samples
        if labels is None:
            product = GGNProduct(rank.model, rank.tracked, owned=mine, combine=combine)
        else:
            product = FisherProduct(rank.model, rank.tracked, inner_samples, labels, owned=mine, combine=combine)
        if micro is not None:
            product = MicroBatchedProduct(product, micro, 1 if mode == "data" else label_samples)
        if mode == "data":
            product = SlicedProduct(product, rank.rank, rank.world_size, label_samples, labels)
        sampler = MinibatchSampler(
            rank.training_batches(corpus, rank.cfg.factors.batch_size, rank.cfg.factors.max_sequences),
            cfg.minibatch_size, generator,
        )
    heldout = None
    if sampler is not None and cfg.heldout_every > 0:  # a fixed batch of its own generator, sliced in mode data
        size = max(cfg.heldout_batch_size, rank.world_size) if mode == "data" else cfg.heldout_batch_size
        heldout = sampler.draw(size, torch.Generator().manual_seed(cfg.seed + 1))
    num_queries = next(iter(grads.values())).shape[0]
    records: list[dict] = []
    piece = memory_query_chunk(rank.tracked, next(iter(grads.values())).dtype, rank.device)
    for chunk_start in range(0, num_queries, cfg.query_batch_size):
        chunk_stop = min(chunk_start + cfg.query_batch_size, num_queries)
        if mode in ("data", "modules"):  # every rank runs the whole chunk
            parts = [(chunk_start, chunk_stop)]
        else:
            lo, hi = slice_bounds(chunk_stop - chunk_start, rank.world_size, rank.rank)
            parts = [(chunk_start + s, min(chunk_start + s + piece, chunk_start + hi)) for s in range(lo, hi, piece)]
        start_state = generator.get_state()
        label_state = labels.get_state() if labels is not None else None
        longest, longest_labels = 0, label_state  # the longest piece here and the label state it left
        for lo, hi in parts:
            generator.set_state(start_state)
            if labels is not None:
                labels.set_state(label_state)
            counting = CountingSampler(sampler) if sampler is not None else None
            started, sent_before = time.perf_counter(), sum(sent_bytes().values())
            result = solve_ihvp(
                {n: g[lo:hi] for n, g in grads.items()}, preconditioner, product, counting, cfg, damping,
                query_ids=[str(q) for q in range(lo, hi)], heldout=heldout,
                on_iteration=lambda *_: rank.advance("it", 1), sharding=sharding,
            )
            seconds = time.perf_counter() - started
            drawn = counting.drawn if counting is not None else 0
            if drawn >= longest:  # pieces of equal length drew the same stream
                longest = drawn
                longest_labels = labels.get_state() if labels is not None else None
            if mode != "data" or rank.rank == 0:
                records.append({
                    "start": lo, "stop": hi, "chunk_start": chunk_start,
                    "x": {} if shadow else {name: x.cpu() for name, x in result.x.items()}, "status": result.status,
                    "state_bytes": vec_nbytes(grads, result.x),
                    "iterations": result.iterations, "messages": result.messages, "trace": result.trace.columns(),
                    "heldout": result.heldout.columns(), "heldout_seconds": result.heldout_seconds,
                    "seconds": seconds, "sent_bytes": sum(sent_bytes().values()) - sent_before,
                    "heldout_batch_size": 0 if heldout is None else int(heldout["input_ids"].shape[0]),
                    "sequences": counting.sequences if counting is not None else 0,
                    "tokens": counting.tokens if counting is not None else 0,
                })
        if mode == "queries" and cfg.name != "ekfac" and (rank.world_size > 1 or len(parts) > 1):
            generator.set_state(start_state)
            if labels is not None:
                labels.set_state(label_state)
            here = longest
            (longest,) = all_reduce_counts(longest, op=torch.distributed.ReduceOp.MAX)
            fast_forward(sampler, longest)
            if labels is not None:  # the lowest rank whose piece ran longest holds the stream's end
                (source,) = all_reduce_counts(rank.rank if here == longest else rank.world_size,
                                              op=torch.distributed.ReduceOp.MIN)
                labels.set_state(broadcast_state(longest_labels, source))
    return records


def _log_trace(ctx: Context, logger_name: str, pieces: list[dict], trace: pa.Table, heldout: pa.Table | None) -> None:
    """The ranks' convergence traces into the tracker (context.solver_logger): chunk after chunk on one continuous
    iteration axis, per iteration the aggregates over the chunk's running queries, the held-out evaluations at
    their iterations; then the tables and charts once."""
    logger = solver_logger(ctx, logger_name)
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


def solve_directions(
    ctx: Context, factors: EkfacFactors | str, grads: dict[str, torch.Tensor] | str, damping: float,
    query_ids: Sequence[str], logger_name: str, trajectory: str | None = None, checkpoints: Sequence[int] = (),
) -> tuple[Vectors, list[str], pa.Table | None, pa.Table | None, dict | None]:
    """`rank_solve` on the executor, its pieces put back in query order: (directions, statuses, trace, held-out
    table, held-out record); the trace is logged under solve/<logger_name>/ and the ranks' warnings printed, the
    largest solver state a rank held under solve/<logger_name>/max_rank_state_bytes."""
    cfg = ctx.cfg.solver
    mode = solve_mode(ctx.cfg) if cfg.name != "ekfac" else "queries"
    iterative = cfg.name != "ekfac"
    num_queries = len(query_ids)
    steps = num_queries * cfg.iterations * (cfg.lissa_repeats if cfg.name == "lissa" else 1) if iterative else 0
    with progress_bar(f"solve ({logger_name})", steps or None, "it") as advance:
        per_rank = ctx.executor.map(
            rank_solve, str(ctx.corpus), factors, grads, damping, mode, trajectory, tuple(checkpoints),
            cfg=ctx.cfg, what=f"solve ({logger_name})", progress=lambda unit, n: advance(n),
        )
    ctx.tracker.log({
        f"solve/{logger_name}/max_rank_state_bytes": max(p["state_bytes"] for records in per_rank for p in records),
        f"solve/{logger_name}/max_rank_sent_bytes_per_iteration": max(
            p["sent_bytes"] / max(1, *p["iterations"]) for records in per_rank for p in records),
    })
    if mode == "modules":  # the ranks ran the same pieces, each holding its modules' blocks
        for i, p in enumerate(per_rank[0]):
            p["x"] = {n: x for records in per_rank for n, x in records[i]["x"].items()}
        per_rank = per_rank[:1]
    pieces = sorted((p for records in per_rank for p in records), key=lambda p: p["start"])
    directions = {n: torch.cat([p["x"][n] for p in pieces]) for n in ctx.tracked}
    statuses = [s for p in pieces for s in p["status"]]
    if len(statuses) != num_queries:
        raise DastraError(f"internal: the ranks solved {len(statuses)} of {num_queries} queries")
    for p in pieces:
        for message in p["messages"]:
            console.print(f"[yellow]warning:[/] {logger_name}: {message}", highlight=False)
    if not iterative:
        return directions, statuses, None, None, None
    traces, held = [], []
    for p in pieces:
        for key, tables, to_table in (("trace", traces, trace_table), ("heldout", held, heldout_table)):
            columns = dict(p[key])
            columns["query"] = [p["start"] - p["chunk_start"] + q for q in columns["query"]]
            columns["query_id"] = [query_ids[int(q)] for q in columns["query_id"]]
            tables.append(to_table(columns))
    trace = pa.concat_tables(traces)
    heldout = heldout_info = None
    if any(p["heldout_batch_size"] for p in pieces):
        heldout = pa.concat_tables(held)
        heldout_info = {
            **heldout_meta(cfg, sum(p["heldout_seconds"] for p in pieces), sum(p["seconds"] for p in pieces)),
            "batch_size": max(p["heldout_batch_size"] for p in pieces),
        }
    _log_trace(ctx, logger_name, pieces, trace, heldout)
    ctx.tracker.count(query_iterations=trace.num_rows, sequences=sum(p["sequences"] for p in pieces),
                      tokens=sum(p["tokens"] for p in pieces))
    return directions, statuses, trace, heldout, heldout_info


@metered(lambda ctx: f"solve/{ctx.cfg.solver.name}")
def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f for every query with `solver.name` (seeds §3-5) into ihvp/<solver>/; returns the damping λ.

    Iterative solvers share each curvature minibatch across a chunk of `solver.query_batch_size` queries; their
    minibatches are drawn with replacement from the corpus sequences (the first `factors.max_sequences`).
    """
    cfg = ctx.cfg.solver
    if cfg.name in SOURCE_SOLVERS:
        raise DastraError(f"internal: solver '{cfg.name}' is solved by stages/source.py")
    check_meta(load_factors_meta(ctx.paths.factors), factor_meta(ctx), f"factors at '{ctx.paths.factors}'", "fit")
    ids, grads = query_gradients_folder(ctx)  # each rank reads the modules it holds
    damping = run_damping(ctx)
    directions, statuses, trace, heldout, heldout_info = solve_directions(
        ctx, str(ctx.paths.factors), str(grads), damping, [str(q) for q in ids], cfg.name
    )
    write_directions(ctx, ids, directions, statuses, damping, trace, heldout, heldout_info)
    scope = f"solve/{cfg.name}"
    ctx.tracker.log({
        f"{scope}/damping": damping, f"{scope}/num_ranks": ctx.executor.world_size,
        **{f"{scope}/num_{s}": statuses.count(s) for s in set(statuses)},
        **({f"{scope}/heldout/cost_fraction": heldout_info["cost_fraction"]} if heldout_info else {}),
    })
    log_rank_memory(ctx, scope)
    return damping
