"""Memory per GPU and per node, FLOPs and time of every stage of a run, from the model's config alone.

Per stage, memory per GPU = the model's parameters as placed by the ZeRO stage + the peak of what one step of the
stage allocates, measured by replaying that step on the `meta` device (`plan.simulate`). That step holds what the
stage keeps resident (A and S sums; eigenbases and Λ; the query gradients; the solver's [Q, D] vectors; the solved
directions) and its transients at the configured micro-batch (activations saved for backward, logits, Ds of every
tracked module, the per-module products). FLOPs are the replay's matmul FLOPs scaled to the corpus; time is FLOPs
over (GPUs × `plan.throughput_tflops`).

Parameters under ZeRO (inference: no gradients, no optimizer state): stages 0-2 hold every parameter on every GPU
(DeepSpeed's stages 1 and 2 shard only optimizer state and gradients, which attribution has none of); stage 3 holds
1/N of them plus the gathered working set (the largest module, plus DeepSpeed's prefetch bucket). The exact GGN
product needs whole weights (`torch.func`), so `solver.product: ggn` plans the solve replicated.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pyarrow.parquet as pq
import torch

from distributed_astra.config import Config
from distributed_astra.curvature.covariance import STAT_DTYPES
from distributed_astra.distributed import score_mode, solve_mode
from distributed_astra.distributed.deepspeed_config import effective_stage
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.products import DEFAULT_TANGENT_ELEMENTS
from distributed_astra.ihvp.solvers import LIVE_VECTORS_PER_QUERY, state_storage
from distributed_astra.models.load import DTYPES
from distributed_astra.models.modules import TrackedModule
from distributed_astra.ownership import busiest_owned, factor_elements
from distributed_astra.plan import shapes, simulate
from distributed_astra.plan.simulate import StepCost, measure, meta_batch
from distributed_astra.scoring.low_rank import stored_like
from distributed_astra.scoring.projection import module_dims

GIB = 1 << 30
ZERO3_PREFETCH_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size of configs/ds/zero3.json (DeepSpeed's default)
MAX_SEARCHED_QUERIES = 1024  # the search for the most queries one scoring pass holds stops here (replays cost Q)
EIGH_FLOPS_PER_CUBE = 9  # eigh with eigenvectors: about 9 n³ (tridiagonal reduction plus back-transformation)


def parse_memory(text: str, field_name: str = "plan.gpu_memory") -> int:
    """'80GB', '80GiB', '80G', '512MB' -> bytes; GB and GiB both mean 2³⁰ bytes (an '80GB' GPU has 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise DastraError(f"{field_name}: '{text}' is not a memory size; write e.g. 80GB or 40GiB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def detected_device_memory() -> tuple[int, str]:
    """(bytes, what) of this machine's first GPU, or of its RAM when it has none."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM (no GPU)"


def _parquet_rows(path: str) -> int | None:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class StageEstimate:
    """One stage, per GPU: the parameters, what the stage keeps resident (`resident_what`), and the working memory
    of one step at `batch` (activations, logits, Ds, products); its FLOPs and time over the whole run."""

    stage: str
    parameters: int
    resident: int
    resident_what: str
    working: int
    flops: float | None
    seconds: float | None
    batch: str
    by_owner: bool = False  # the resident state is the busiest owner rank's modules' (`ownership`)

    @property
    def per_gpu(self) -> int:
        return self.parameters + self.resident + self.working


@dataclass
class Plan:
    model_name: str
    num_parameters: int
    tracked_parameters: int
    num_tracked_modules: int
    gpus: int
    gpus_per_node: int
    gpu_memory: int
    device: str
    budget: int  # usable bytes per GPU (gpu_memory less the reserve)
    throughput_tflops: float
    documents: int | None
    documents_source: str
    num_queries: int
    queries_source: str
    zero_stage: int
    zero_parameters: dict[int, int]  # bytes per GPU of the parameters under ZeRO stage 0..3
    stages: list[StageEstimate]
    store_bytes: int | None
    projection_dim: int
    max_micro_batch: dict[str, int] = field(default_factory=dict)  # per batch field: the largest that fits
    max_query_chunk: int | None = None  # None: the solver does not iterate (ekfac)
    max_scored_queries: int = 0
    solve_mode: str = "queries"
    score_mode: str = "replicas"
    scoring_passes: int = 1  # corpus passes scoring all queries takes: one per scoring.queries_per_pass chunk
    busiest_owner: list[str] = field(default_factory=list)  # the tracked modules the busiest owner rank holds

    @property
    def busiest_owner_modules(self) -> int:
        return len(self.busiest_owner)

    @property
    def gpus_on_a_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    def failing(self) -> list[StageEstimate]:
        return [s for s in self.stages if s.per_gpu > self.budget]

    @property
    def fits(self) -> bool:
        return not self.failing()


def _zero_parameters(num_params: int, largest_leaf: int, gpus: int, dtype_bytes: int) -> dict[int, int]:
    full = num_params * dtype_bytes
    working = min(num_params, largest_leaf + ZERO3_PREFETCH_ELEMENTS) * dtype_bytes
    sharded = math.ceil(num_params / gpus) * dtype_bytes + working
    return {0: full, 1: full, 2: full, 3: min(full, sharded)}


def _projection_dim(cfg: Config, tracked: dict[str, TrackedModule]) -> int:
    """The projected store's width: Σ over tracked modules of k_out·k_in from the `projection` section, each side
    capped at the module's own (a k at least the side is the identity; scoring/projection.py)."""
    section = cfg.projection
    total = 0
    for name, module in tracked.items():
        k_out, k_in = module_dims(name, (section.out_dim, section.in_dim), section.per_module)
        total += min(k_out, module.shape[0]) * min(k_in, module.shape[1])
    return total


def _largest_fitting(memory_at: Callable[[int], int], configured: int, budget: int, limit: int = 1 << 20) -> int:
    """The largest n in [1, limit] with memory_at(n) <= budget (0 if none). Memory is close to affine in the
    micro-batch and in the query chunk (activations and [Q, D] vectors grow linearly), so two replays give a
    guess; replays at the guess and next to it confirm it, and a bisection corrects it where a step changes its
    contraction order with the batch size."""
    if memory_at(1) > budget:
        return 0
    points = [1, configured if configured > 1 else 2]
    for _ in range(3):  # secant steps on memory(n) = budget
        (n0, n1) = points[-2:]
        slope = max(1e-9, (memory_at(n1) - memory_at(n0)) / (n1 - n0))
        guess = int(min(limit, max(1, n1 + (budget - memory_at(n1)) // slope)))
        if guess in points:
            break
        points.append(guess)
    if memory_at(guess) <= budget and (guess >= limit or memory_at(guess + 1) > budget):
        return guess
    if memory_at(guess) > budget:
        lo, hi = 1, guess
    else:  # the guess fits: gallop up until something does not
        lo, step = guess, 1
        while True:
            nxt = min(limit, lo + step)
            if nxt == lo:
                return lo
            if memory_at(nxt) > budget:
                hi = nxt
                break
            lo, step = nxt, max(step * 2, lo // 8)
    while hi - lo > 1:  # memory_at(lo) fits, memory_at(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_at(mid) <= budget else (lo, mid)
    return lo


def make_plan(cfg: Config, gpus: int | None = None, gpu_memory: str | None = None, search: bool = True) -> Plan:
    """The plan of `cfg` on `gpus` GPUs of `gpu_memory` each (defaults: `plan.gpus` or `ray.num_workers`, and
    `plan.gpu_memory` or this machine's GPU/RAM). `search`: also find the largest micro-batch and query chunk."""
    pc = cfg.plan
    gpus = gpus or pc.gpus or cfg.ray.num_workers
    memory_text = gpu_memory or pc.gpu_memory
    if memory_text:
        memory, device = parse_memory(memory_text), f"{memory_text} per GPU (stated)"
    else:
        memory, device = detected_device_memory()
    budget = int(memory * (1 - pc.memory_reserve))

    hf_config = shapes.model_config(cfg)
    model = shapes.meta_model(hf_config, cfg.model.dtype)
    tracked = shapes.tracked_modules(model, cfg)
    num_params = shapes.parameter_count(model)
    d_tracked = shapes.tracked_parameters(tracked)
    model_bytes = DTYPES[cfg.model.dtype].itemsize
    stat = STAT_DTYPES[cfg.factors.dtype]
    compute = torch.float64 if stat == torch.float64 and DTYPES[cfg.model.dtype] == torch.float64 else torch.float32
    state = state_storage(cfg.solver, stat)  # v and the solver's vectors
    seq_len = cfg.data.max_length
    zero = _zero_parameters(num_params, shapes.largest_leaf_parameters(model), gpus, model_bytes)
    stage = effective_stage(cfg.deepspeed.stage)
    params = zero[stage]
    on_gpus = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_workers": gpus})})
    if stage == 3:  # the run refuses ZeRO-3 + GGN when it solves; plan it anyway
        mode = "modules" if cfg.ray.solve_mode == "modules" else "data"
    else:  # the mode the run picks on `gpus` ranks
        mode = solve_mode(on_gpus)
    solve_params = zero[0] if mode == "queries" else params
    scoring_mode = score_mode(on_gpus)  # modules: the group's ranks, the owners' directions; replicas: whole
    score_params = params if scoring_mode == "modules" else zero[0]
    # the busiest owner (`ownership.run_owners`, the runtime's own placement): the fit and the query stage always
    # keep state by owner, the solve only in mode modules
    mine = {n: tracked[n] for n in busiest_owned(cfg, {n: t.shape for n, t in tracked.items()}, gpus)}
    solve_tracked = mine if mode == "modules" else tracked
    score_tracked = mine if scoring_mode == "modules" else tracked
    score_world = gpus if scoring_mode == "modules" else 1

    documents, documents_source = pc.documents, "plan.documents"
    if documents is None and cfg.data.corpus != "demo":
        documents, documents_source = _parquet_rows(cfg.data.corpus), f"rows of {cfg.data.corpus}"
    if documents is None and cfg.data.corpus == "demo":
        documents, documents_source = cfg.data.num_stdlib_docs + cfg.data.num_facts, "demo corpus"
    if documents is None:
        documents_source = "unknown: set plan.documents"
    num_queries = _parquet_rows(cfg.data.queries) if cfg.data.queries != "demo" else None
    queries_source = f"rows of {cfg.data.queries}"
    if num_queries is None:
        num_queries, queries_source = cfg.solver.query_batch_size, "one solver.query_batch_size chunk (queries unread)"
    tokens_per_doc = pc.tokens_per_document or seq_len
    sequences = documents * math.ceil(tokens_per_doc / seq_len) if documents else None
    fit_sequences = min(sequences, cfg.factors.max_sequences) if sequences and cfg.factors.max_sequences else sequences
    throughput = pc.throughput_tflops * 1e12

    def seconds(flops: float | None) -> float | None:
        return None if flops is None else flops / (gpus * throughput)

    def scaled(cost: StepCost, per: int, count: int | None) -> float | None:
        return None if count is None else cost.flops / per * count

    fb, qb, mb = cfg.factors.batch_size, cfg.solver.query_batch_size, cfg.solver.minibatch_size
    sb = cfg.scoring.batch_size
    chunk_q = min(qb, num_queries)

    @cache
    def cov_at(b: int) -> StepCost:
        return measure(lambda: simulate.covariance_step(model, tracked, meta_batch(b, seq_len), stat, compute, mine,
                                                        gpus))

    @cache
    def lam_at(b: int) -> StepCost:
        return measure(lambda: simulate.lambda_step(model, tracked, meta_batch(b, seq_len), stat, compute, mine,
                                                    gpus))

    @cache
    def query_at(b: int) -> StepCost:
        return measure(lambda: simulate.query_step(model, tracked, meta_batch(b, seq_len), stat, num_queries, mine,
                                                   state))

    # mode `queries`: every GPU runs the whole minibatch for its share of a chunk's queries; mode `data`: every GPU
    # runs every query of the chunk on its slice of the minibatch; mode `modules`: every GPU runs the whole
    # minibatch for every query of the chunk on its own modules (stages/solve.py)
    rank_minibatch = math.ceil(mb / gpus) if mode == "data" else mb
    # solver.micro_batch_size: each product pass sees at most that many rows (ihvp.products.MicroBatchedProduct)
    passes = math.ceil(rank_minibatch / cfg.solver.micro_batch_size) if cfg.solver.micro_batch_size else 1
    rank_minibatch = math.ceil(rank_minibatch / passes)
    rank_queries = math.ceil(chunk_q / gpus) if mode == "queries" else chunk_q

    @cache
    def astra_at(q: int) -> StepCost:
        batch = meta_batch(rank_minibatch, seq_len)
        if cfg.solver.product == "fisher":
            return measure(lambda: simulate.fisher_step(model, tracked, batch, stat, compute, q, solve_tracked, state))
        return measure(lambda: simulate.astra_step(model, tracked, batch, stat, q, DEFAULT_TANGENT_ELEMENTS,
                                                   solve_tracked, state))

    @cache
    def score_at(b: int, q: int = num_queries) -> StepCost:
        return measure(lambda: simulate.score_step(model, tracked, meta_batch(b, seq_len), compute, q, cfg.scoring,
                                                   score_tracked, score_world))

    stages: list[StageEstimate] = []

    def sum_bytes_of(modules: dict[str, TrackedModule]) -> int:  # the A and S sums
        return sum((t.in_dim**2 + t.out_features**2) * stat.itemsize for t in modules.values())

    def factors_of(modules: dict[str, TrackedModule]) -> int:  # Q_A, d_A, Q_S, d_S, Λ: what the owner keeps
        return sum(factor_elements(t.shape) for t in modules.values()) * stat.itemsize

    factor_bytes, vector_bytes = sum_bytes_of(mine), shapes.tracked_parameters(mine) * state.itemsize
    solve_vector_bytes = shapes.tracked_parameters(solve_tracked) * state.itemsize

    def add(name, parameters, resident, what, peak, flops, batch, by_owner=True):
        stages.append(StageEstimate(name, parameters, resident, what, peak - resident, flops, seconds(flops), batch,
                                    by_owner))

    tokens = f"x {seq_len} tokens"
    cov = cov_at(fb)
    add("covariances", params, factor_bytes, "A, S sums", cov.peak_bytes, scaled(cov, fb, fit_sequences),
        f"factors.batch_size {fb} {tokens}")
    eig = measure(lambda: simulate.eigen_step(mine, stat))
    eig_flops = float(sum(EIGH_FLOPS_PER_CUBE * d**3 for t in tracked.values() for d in (t.in_dim, t.out_features)))
    add("eigendecomposition", params, factor_bytes, "A, S sums", eig.peak_bytes, eig_flops,
        f"{2 * len(tracked)} eigh, {2 * len(mine)} on the busiest owner")
    lam = lam_at(fb)
    add("eigenvalue correction", params, factors_of(mine), "eigenbases, Λ sums", lam.peak_bytes,
        scaled(lam, fb, fit_sequences), f"factors.batch_size {fb} {tokens}")
    query_batch = min(cfg.solver.query_forward_batch, num_queries)
    qry = query_at(query_batch)
    query_batches = math.ceil(num_queries / query_batch)
    add("query gradients", params, num_queries * vector_bytes, f"{num_queries} query gradients of its modules",
        qry.peak_bytes, float(qry.flops) * query_batches, f"{query_batches} batch(es) of {query_batch} {tokens}")
    if cfg.solver.name != "ekfac":
        if cfg.solver.product == "ggn":  # the set-up plus one replayed tangent chunk per chunk of queries
            vocab = model.get_output_embeddings().out_features
            tangent = max(1, DEFAULT_TANGENT_ELEMENTS // (rank_minibatch * seq_len * vocab))
            one, two = astra_at(min(tangent, rank_queries)), astra_at(min(2 * tangent, rank_queries))
            per_chunk = max(0, two.flops - one.flops)
            per_iteration = (one.flops + per_chunk * max(0, math.ceil(rank_queries / tangent) - 1)) * passes
        else:
            per_iteration = astra_at(rank_queries).flops * cfg.solver.fisher_samples * passes
        per_iteration += simulate.ekfac_apply_flops(solve_tracked, rank_queries)
        ranks_busy = min(gpus, math.ceil(chunk_q / rank_queries)) if mode == "queries" else gpus
        astra_flops = float(per_iteration) * ranks_busy * cfg.solver.iterations * math.ceil(num_queries / chunk_q)
        ast = astra_at(rank_queries)
        vectors = LIVE_VECTORS_PER_QUERY * rank_queries * solve_vector_bytes
        add(f"{cfg.solver.name} chunk ({mode})", solve_params, factors_of(solve_tracked) + vectors,
            f"eigenbases, Λ, {LIVE_VECTORS_PER_QUERY} [Q, D] vectors", ast.peak_bytes, astra_flops,
            f"{rank_queries} queries, {passes} pass(es) of {rank_minibatch} {tokens} per GPU, "
            f"{cfg.solver.product} product, {cfg.solver.iterations} it", by_owner=mode == "modules")
    per_pass = min(cfg.scoring.queries_per_pass or num_queries, num_queries)  # stages/score.py's query_chunks
    score_passes = math.ceil(num_queries / per_pass)
    scr = score_at(sb, per_pass)
    held = sum(stored_like(per_pass, t.shape, cfg.scoring, compute, "meta").nbytes for t in score_tracked.values())
    storage = (f"rank {cfg.scoring.direction_rank} factors" if cfg.scoring.direction_rank else "whole") + (
        f", {cfg.scoring.direction_dtype}")
    one_pass = scaled(scr, sb, sequences)
    add("scoring", score_params, held, f"directions of {per_pass} queries ({storage}) of its modules",
        scr.peak_bytes, None if one_pass is None else one_pass * score_passes,
        f"scoring.batch_size {sb} {tokens}, {scoring_mode}, {score_passes} pass(es) of {per_pass} queries",
        by_owner=scoring_mode == "modules")
    projection_dim = _projection_dim(cfg, tracked)
    store_itemsize = torch.empty((), dtype=getattr(torch, cfg.index.store_dtype)).element_size()
    store = documents * projection_dim * store_itemsize if documents else None

    plan = Plan(
        model_name=cfg.model.hub_id or cfg.model.path or f"{cfg.model.source} GPT-2",
        num_parameters=num_params,
        tracked_parameters=d_tracked,
        num_tracked_modules=len(tracked),
        gpus=gpus,
        gpus_per_node=pc.gpus_per_node,
        gpu_memory=memory,
        device=device,
        budget=budget,
        throughput_tflops=pc.throughput_tflops,
        documents=documents,
        documents_source=documents_source,
        num_queries=num_queries,
        queries_source=queries_source,
        zero_stage=cfg.deepspeed.stage,
        zero_parameters=zero,
        stages=stages,
        store_bytes=store,
        projection_dim=projection_dim,
        solve_mode=mode,
        busiest_owner=list(mine),
        score_mode=scoring_mode,
        scoring_passes=score_passes,
    )
    if not search:
        return plan
    free = budget - params
    plan.max_micro_batch = {
        "factors.batch_size": _largest_fitting(lambda b: max(cov_at(b).peak_bytes, lam_at(b).peak_bytes), fb, free),
        "scoring.batch_size": _largest_fitting(lambda b: score_at(b).peak_bytes, sb, budget - score_params),
    }
    if cfg.solver.name != "ekfac":
        per_gpu = _largest_fitting(lambda q: astra_at(q).peak_bytes, rank_queries, budget - solve_params)
        plan.max_query_chunk = per_gpu * gpus if mode == "queries" else per_gpu
    plan.max_scored_queries = _largest_fitting(lambda q: score_at(sb, q).peak_bytes, num_queries,
                                               budget - score_params, limit=MAX_SEARCHED_QUERIES)
    return plan


def does_not_fit(plan: Plan, also: str = "") -> DastraError:
    """The one-line error of a plan whose stages do not fit: the worst stage, its memory, the budget and the fix."""
    owner_bound = [s for s in plan.failing() if s.by_owner]
    if owner_bound and plan.busiest_owner_modules == 1:  # one module on a rank: more ranks do not shrink it
        worst = max(owner_bound, key=lambda s: s.per_gpu)
        return DastraError(
            f"the planner says stage '{worst.stage}' needs {worst.per_gpu / GIB:.2f} GiB per GPU, more than the "
            f"{plan.budget / GIB:.2f} GiB usable on {plan.device}, and its {worst.resident / GIB:.2f} GiB of "
            f"{worst.resident_what} belong to one module, {plan.busiest_owner[0]}, which more GPUs cannot split: "
            "track fewer or smaller modules (model.tracked_modules), store its state in bfloat16 "
            "(solver.state_dtype, scoring.direction_dtype) or low rank (scoring.direction_rank), or lower "
            "solver.query_batch_size"
            f"{', ' + also if also else ''}"
        )
    worst = max(plan.failing(), key=lambda s: s.per_gpu)
    most = f"={plan.max_scored_queries}" if plan.max_scored_queries else ""
    if worst.stage == "scoring":
        storage = "; scoring: store the directions in bfloat16 or low rank (scoring.direction_dtype, " \
            "scoring.direction_rank), held by module owners (ray.score_mode=modules), or score fewer queries per " \
            f"pass (scoring.queries_per_pass{most})"
    elif worst.stage == "query gradients" or " chunk (" in worst.stage:
        storage = "; store the query gradients and the solver's vectors in bfloat16 (solver.state_dtype=bfloat16)"
    else:
        storage = ""
    return DastraError(
        f"the planner says stage '{worst.stage}' needs {worst.per_gpu / GIB:.2f} GiB per GPU, more than the "
        f"{plan.budget / GIB:.2f} GiB usable on {plan.device}: lower the batch sizes / solver.query_batch_size "
        f"to what the table says fits, add GPUs (plan.gpus, ray.num_workers){storage}{', ' + also if also else ''}"
    )
