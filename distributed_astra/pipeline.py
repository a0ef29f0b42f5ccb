"""The pipeline: one function per stage, each reading the previous stage's artifacts through the run context
(context.py). fit, solve and score run in this process, or on Ray workers under DeepSpeed when
`ray.num_workers > 1` (distributed/stages.py).

    prepare -> fit -> query -> solve -> score -> report    (`run` does them all, plus solver.baselines)
    index / search                                        (projected gradient store + faiss, index/stages.py)
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_astra.artifacts import atomic_path, meta_matches, open_tensors, read_meta, save_tensors, write_json
from distributed_astra.config import SOURCE_SOLVERS, Config
from distributed_astra.context import (
    Context,
    check_directions,
    counted,
    curvature_minibatches,
    factor_meta,
    heldout_batch,
    heldout_meta,
    load_directions,
    load_query_gradients,
    open_context,
    query_meta,
    solver_logger,
    topk_table,
    write_directions,
)
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import FACTORS_FILE, EkfacFactors, fit_ekfac, load_factors, save_factors
from distributed_astra.data.sequences import QueryId, iter_query_batches, load_queries
from distributed_astra.errors import DastraError
from distributed_astra.eval.recall import fact_recall
from distributed_astra.ihvp.ekfac import default_damping, mean_eigenvalue
from distributed_astra.ihvp.monitor import heldout_summary
from distributed_astra.ihvp.solvers import SolveResult, ekfac_preconditioner
from distributed_astra.ihvp.solvers import solve as solve_ihvp
from distributed_astra.progress import console, progress_bar
from distributed_astra.scoring.gradients import captured_batches, query_gradients
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.topk import StreamingTopK
from distributed_astra.source import stages as source_stages
from distributed_astra.tracking import metered


def distributed_stages():
    """distributed/stages.py, imported on first use: Ray and DeepSpeed load only for distributed runs."""
    from distributed_astra.distributed import stages  # deferred: Ray and DeepSpeed, for distributed runs only

    return stages


def reused(ctx: Context, name: str) -> tuple[bool, object]:
    """`dastra run` and `dastra eval facts` reuse fit's and query's artifacts when they were made for the same model,
    corpus and settings (their meta.json agrees with what the stage would write), as the single stages check before
    reading them: (reused, the factors for `fit`)."""
    if name == "fit":
        expected = {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype}
        if meta_matches(ctx.paths.factors, expected):
            try:
                factors = load_factors(ctx.paths.factors, expected)
            except DastraError as exc:
                console.print(f"[yellow]warning:[/] {exc}: fitting again", highlight=False, soft_wrap=True)
                return False, None
            console.print("reusing factors/ (same model, corpus and factors settings)", highlight=False)
            return True, factors
    if name == "query" and meta_matches(ctx.paths.queries, query_meta(ctx)):
        if (ctx.paths.queries / "gradients.safetensors").is_file():
            console.print("reusing queries/ (same model and queries)", highlight=False)
            return True, None
    return False, None


@metered("fit")
def fit(ctx: Context) -> EkfacFactors:
    """Two passes over the corpus: covariances A, S, then the eigenvalue correction Λ (seeds §3)."""
    if ctx.distributed:
        return distributed_stages().fit(ctx)
    cfg = ctx.cfg.factors
    num_sequences = sum(len(b["doc_id"]) for b in ctx.training_batches(cfg.batch_size, cfg.max_sequences))
    if num_sequences == 0:
        raise DastraError(f"data.corpus '{ctx.corpus}' yields no token sequences; give it non-empty documents")
    with progress_bar("fit EK-FAC (2 passes)", 2 * num_sequences, "seq") as advance:
        factors = fit_ekfac(
            ctx.model,
            ctx.tracked,
            lambda: ctx.training_batches(cfg.batch_size, cfg.max_sequences),
            ctx.stat_dtype,
            cfg.seed,
            on_batch=lambda part, rows, log=ctx.tracker.progress("fit", num_sequences): (advance(rows), log(part, rows)),
        )
    save_factors(factors, ctx.paths.factors, {**factor_meta(ctx), "dtype": cfg.dtype, "versions": ctx.versions()})
    ctx.tracker.log({"fit/num_sequences": num_sequences, "fit/mean_lambda": mean_eigenvalue(factors)})
    ctx.tracker.count(tokens=2 * factors.num_tokens, sequences=2 * num_sequences)  # two passes
    return factors


@metered("query")
def query(ctx: Context) -> None:
    """∇θ f(z_q) on the completion tokens of every query, saved per module."""
    queries = load_queries(ctx.queries)
    batches = counted(iter_query_batches(queries, ctx.tokenizer, ctx.cfg.solver.query_batch_size), ctx.tracker)
    with progress_bar("query gradients", len(queries), "queries") as advance:
        _, grads = query_gradients(ctx.model, ctx.tracked, batches, ctx.stat_dtype, on_batch=advance)
    ids = [q.query_id for q in queries]
    with atomic_path(ctx.paths.queries) as tmp:
        tmp.mkdir()
        save_tensors(grads, tmp / "gradients.safetensors")
        write_json(
            tmp / "meta.json",
            {**query_meta(ctx), "num_queries": len(ids), "query_ids": ids},
        )


@metered(lambda ctx: f"solve/{ctx.cfg.solver.name}")
def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f for every query with the configured solver (seeds §3-5); returns the damping λ used.

    Iterative solvers share each curvature minibatch across a chunk of `solver.query_batch_size` queries; their
    minibatches are drawn with replacement from the corpus sequences (the first `factors.max_sequences`).
    `source` / `astra-source` solve per segment of the training trajectory (source/stages.py, seeds §6-7).
    """
    if ctx.distributed:
        return distributed_stages().solve(ctx)
    cfg = ctx.cfg.solver
    if cfg.name in SOURCE_SOLVERS:
        return source_stages.solve(ctx)
    factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    ids, grads = load_query_gradients(ctx)
    damping = default_damping(factors) if cfg.damping == "auto" else float(cfg.damping)
    preconditioner = ekfac_preconditioner(factors, cfg, damping, ctx.cfg.factors.strategy)
    product, sampler = None, None
    if cfg.name != "ekfac":  # the iterative solvers need G̃·v on minibatches of the corpus
        product, sampler = curvature_minibatches(ctx)
    heldout = heldout_batch(ctx, sampler)
    batches = counted(sampler, ctx.tracker) if sampler is not None else None
    starts = range(0, len(ids), cfg.query_batch_size)
    iterative = cfg.name != "ekfac"
    steps_per_chunk = cfg.iterations * (cfg.lissa_repeats if cfg.name == "lissa" else 1) if iterative else 1
    results: list[SolveResult] = []
    logger = solver_logger(ctx) if iterative else None
    solve_seconds = 0.0
    with progress_bar(f"solve ({cfg.name})", len(starts) * steps_per_chunk, "it") as advance:
        for start in starts:
            chunk_ids = ids[start : start + cfg.query_batch_size]
            log, log_heldout = logger.chunk(chunk_ids) if logger is not None else (None, None)
            done = [0]

            def on_iteration(iteration, objective, residual, lr, log=log, done=done):
                log(iteration, objective, residual, lr)
                ctx.tracker.count(query_iterations=int(torch.isfinite(objective).sum()))
                done[0] += 1
                advance(1)

            started = time.perf_counter()
            result = solve_ihvp(
                {name: g[start : start + len(chunk_ids)] for name, g in grads.items()},
                preconditioner,
                product,
                batches,
                cfg,
                damping,
                query_ids=[str(q) for q in chunk_ids],
                on_iteration=on_iteration,
                heldout=heldout,
                on_heldout=log_heldout,
            )
            solve_seconds += time.perf_counter() - started
            for message in result.messages:
                console.print(f"[yellow]warning:[/] {message}", highlight=False)
            results.append(result)
            advance(steps_per_chunk - done[0])  # the chunk's queries may all stop before the iteration cap
    directions = {name: torch.cat([r.x[name] for r in results]) for name in grads}
    statuses = [status for r in results for status in r.status]
    trace = pa.concat_tables([r.table() for r in results]) if iterative else None
    held = pa.concat_tables([r.heldout_table() for r in results]) if heldout is not None else None
    heldout_info = heldout_meta(cfg, sum(r.heldout_seconds for r in results), solve_seconds) if held else None
    write_directions(ctx, ids, directions, statuses, damping, trace, held, heldout_info)
    if logger is not None:
        logger.finish(trace, held)
    ctx.tracker.log({
        f"solve/{cfg.name}/damping": damping, **{f"solve/{cfg.name}/num_{s}": statuses.count(s) for s in set(statuses)},
        **({f"solve/{cfg.name}/heldout/cost_fraction": heldout_info["cost_fraction"]} if heldout_info else {}),
    })
    return damping


def _direction_scores(
    ctx: Context, compute: torch.dtype, num_sequences: int
) -> tuple[list[QueryId], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """(query ids, an iterator of (document keys, sequence scores [B, Q]) per corpus batch) for `solver.name`'s
    directions at the loaded model: one streamed pass."""
    query_ids, tensors = load_directions(ctx)
    directions = {name: x.to(compute) for name, x in tensors.items()}

    def stream():
        with progress_bar("score corpus", num_sequences, "seq") as advance:
            for batch, capture in captured_batches(
                ctx.model, ctx.tracked, ctx.training_batches(ctx.cfg.scoring.batch_size), compute
            ):
                yield batch["doc_id"], sequence_scores(capture.output_grads, capture.activations, directions)
                advance(len(batch["doc_id"]))

    return query_ids, stream()


@metered(lambda ctx: f"score/{ctx.cfg.solver.name}")
def score(ctx: Context) -> pa.Table:
    """Stream the corpus: τ(z_q, z_m) = X_qᵀ ∇L(z_m) per document, keeping the top-k per query (seeds §1, Eq 2).
    `source` / `astra-source`: τ = Σ_ℓ mean_c w_ℓᵀ ∇L(θ_c, z_m), one pass per checkpoint (source/stages.py)."""
    check_directions(ctx)  # before any work: directions of another corpus, data setting or queries are refused
    if ctx.distributed:
        return distributed_stages().score(ctx)
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    num_sequences = num_tokens = 0
    for batch in ctx.training_batches(ctx.cfg.scoring.batch_size):
        num_sequences += len(batch["doc_id"])
        num_tokens += int(batch["attention_mask"].sum())
    started = time.perf_counter()
    scope = f"score/{ctx.cfg.solver.name}"
    ctx.tracker.define_axis(scope, f"{scope}/batch")
    if ctx.cfg.solver.name in SOURCE_SOLVERS:
        query_ids, scored = source_stages.summed_scores(ctx, compute, num_sequences)
    else:
        query_ids, scored = _direction_scores(ctx, compute, num_sequences)
    top = StreamingTopK(len(query_ids), ctx.cfg.scoring.top_k, keep_all=ctx.cfg.scoring.dense)
    for batch_number, (doc_ids, scores) in enumerate(scored, 1):
        top.update(doc_ids, scores)
        ctx.tracker.log({f"{scope}/batch": batch_number, f"{scope}/sequences": top.num_documents,
                         f"{scope}/fraction": top.num_documents / max(1, num_sequences),
                         f"{scope}/sequences_per_s_so_far": top.num_documents / max(time.perf_counter() - started, 1e-9)})
    scores, doc_ids = top.finish()
    table = topk_table(ctx, query_ids, scores, doc_ids)
    if ctx.cfg.scoring.dense:
        all_keys, all_scores = top.all_scores()
        doc_ids = ctx.open_corpus().doc_ids(all_keys.tolist())
        dense = pa.table({
            "doc_id": [doc_ids[key] for key in all_keys.tolist()],
            **{f"q{q}": all_scores[:, i].numpy() for i, q in enumerate(query_ids)},
        })
        with atomic_path(ctx.paths.scores / "dense.parquet") as tmp:
            pq.write_table(dense, tmp)
    ctx.tracker.log({f"{scope}/num_documents": top.num_documents, f"{scope}/num_queries": len(query_ids)})
    ctx.tracker.count(sequences=num_sequences, tokens=num_tokens)
    return table


def print_topk(table: pa.Table, queries_path: Path, show: int) -> None:
    """A readable table: each query's prompt and completion, then its top documents."""
    from rich.table import Table

    prompts = {q.query_id: q for q in load_queries(queries_path)}
    rows = table.to_pylist()
    for query_id in dict.fromkeys(r["query_id"] for r in rows):
        q = prompts.get(query_id)
        title = f"query {query_id}: {q.prompt!r} -> {q.completion!r}" if q else f"query {query_id}"
        view = Table(title=title, title_justify="left", show_lines=False)
        for column in ("rank", "doc_id", "score", "text"):
            view.add_column(column, overflow="ellipsis", no_wrap=column == "text", max_width=90 if column == "text" else None)
        for r in [r for r in rows if r["query_id"] == query_id][:show]:
            marker = " *" if q and q.fact_doc_id == r["doc_id"] else ""
            view.add_row(str(r["rank"]), f"{r['doc_id']}{marker}", f"{r['score']:.4g}", r["text"].replace("\n", " ")[:200])
        console.print(view)


def index(ctx: Context) -> dict[str, object]:
    """Projected gradient store (Arrow IPC shards) + faiss index over it (index/stages.py)."""
    from distributed_astra.index import stages  # deferred: faiss, for index and search only

    return stages.index(ctx)


def search(ctx: Context) -> pa.Table:
    """Shortlist from the faiss index, exact re-score, top-k per query into search/topk.parquet (index/stages.py).
    New queries (`--queries FILE`) are first given their gradients and directions by `query` and `solve`."""
    from distributed_astra.index import stages  # deferred: faiss, for index and search only

    store = stages.open_searchable(ctx)
    if not stages.directions_fresh(ctx):
        console.print(f"computing and solving the query gradients of {ctx.queries} ({ctx.cfg.solver.name})")
        query(ctx)
        solve(ctx)
    return stages.search(ctx, store)


@metered("report")
def report(ctx: Context) -> Path:
    """Per-token attribution of the shown queries' top-k documents, then the self-contained `report.html`."""
    from distributed_astra.report.build import build_report  # deferred: matplotlib and jinja2, for the report only

    with open_tensors(ctx.paths.factors / FACTORS_FILE, "EK-FAC factors", "fit"):
        pass  # the spectra come last: a missing or damaged factors file is refused before the attribution pass
    return build_report(ctx)


def _log_stage_result(ctx: Context, name: str, result: object, seconds: float) -> None:
    """W&B views of a finished stage (its seconds, memory and throughput come from `metered`): the eigen-spectrum
    (log10 Λ) per module after fit; the top-k table of the scoring method under score/<method>/topk."""
    if name == "fit" and isinstance(result, EkfacFactors):
        for module in result.names:
            ctx.tracker.histogram(f"fit/spectrum/{module}", torch.log10(result[module].lambda_.clamp_min(1e-30)))
    if name == "score" and isinstance(result, pa.Table):
        ctx.tracker.table(
            f"score/{ctx.cfg.solver.name}/topk", {column: result.column(column).to_pylist() for column in result.column_names}
        )


def _wandb_summary(summary: dict[str, object]) -> dict[str, object]:
    """summary.json as the W&B run summary: fact tracing of solver.name at the top level (recall@1, recall@10, mrr),
    each method's figures under `<method>/` (fact tracing, objective and held-out objective, damping, seconds),
    the stages' seconds under `seconds/`."""
    figures: dict[str, object] = {"solver": summary["solver"], "num_queries": summary["num_queries"]}
    methods = {str(summary["solver"]): {k: v for k, v in summary.items() if k not in ("baselines", "seconds", "solver")},
               **summary.get("baselines", {})}  # type: ignore[dict-item]
    figures.update({k: v for k, v in summary["fact_tracing"].items()})  # type: ignore[union-attr]
    for method, values in methods.items():
        for key, value in values.items():
            if isinstance(value, dict):
                figures.update({f"{method}/{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float, str))})
            elif isinstance(value, (int, float, str, bool)):
                figures[f"{method}/{key}"] = value
        figures.update({f"{method}/{k}": v for k, v in values.get("fact_tracing", {}).items()})
    figures.update({f"seconds/{k}": v for k, v in summary["seconds"].items()})  # type: ignore[union-attr]
    return figures


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, object]
    topk: pa.Table
    queries: Path


def _solver_summary(ctx: Context, solver: str) -> dict[str, object]:
    """Status counts of a solve and, for iterative solvers, the mean objective h at the first and last iteration."""
    out_dir = ctx.paths.ihvp(solver)
    meta = read_meta(out_dir, "solved directions", "solve")
    summary: dict[str, object] = {"damping": float(meta["damping"]), "status": meta["status"]}
    if (out_dir / "trace.parquet").is_file():
        trace = pq.read_table(out_dir / "trace.parquet", columns=["query_id", "iteration", "objective"]).to_pydict()
        first: dict[str, tuple[int, float]] = {}
        last: dict[str, tuple[int, float]] = {}
        for q, k, h in zip(trace["query_id"], trace["iteration"], trace["objective"]):
            if q not in first or k < first[q][0]:
                first[q] = (k, h)
            if q not in last or k >= last[q][0]:
                last[q] = (k, h)
        if first:
            summary["objective_first_mean"] = sum(h for _, h in first.values()) / len(first)
            summary["objective_last_mean"] = sum(h for _, h in last.values()) / len(last)
    if (out_dir / "heldout.parquet").is_file():
        summary.update(heldout_summary(pq.read_table(out_dir / "heldout.parquet"), meta.get("heldout", {})))
    return summary


def run(cfg: Config, job: str = "run") -> RunResult:
    """All stages in order, then each `solver.baselines` entry's solve and score; writes summary.json (per-stage
    seconds, fact-tracing recall and the solve's objective per solver) and report.html."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ctx = open_context(cfg, job)
    timings["prepare"] = time.perf_counter() - start
    ctx.tracker.log({"prepare/seconds": timings["prepare"],
                     "prepare/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    queries = load_queries(ctx.queries)
    baselines: dict[str, dict[str, object]] = {}
    try:
        for name, stage in (("fit", fit), ("query", query), ("solve", solve), ("score", score)):
            t0 = time.perf_counter()
            kept, result = reused(ctx, name)
            if not kept:
                result = stage(ctx)
            timings[name] = time.perf_counter() - t0
            _log_stage_result(ctx, name, result, timings[name])
        for solver in dict.fromkeys(b for b in cfg.solver.baselines if b != cfg.solver.name):
            other = replace(
                ctx,
                cfg=cfg.model_copy(update={"solver": cfg.solver.model_copy(update={"name": solver})}),
                paths=replace(ctx.paths, baseline=solver),
            )
            t0 = time.perf_counter()
            solve(other)
            t1 = time.perf_counter()
            table = score(other)
            seconds = {"solve": t1 - t0, "score": time.perf_counter() - t1}
            baselines[solver] = {
                **_solver_summary(ctx, solver), "fact_tracing": fact_recall(table, queries), "seconds": seconds
            }
            _log_stage_result(other, "score", table, seconds["score"])
        recall = fact_recall(result, queries)
        solve_summary = _solver_summary(ctx, cfg.solver.name)
        summary = {
            "solver": cfg.solver.name,
            **solve_summary,
            "seconds": {**timings, "total": time.perf_counter() - start},
            "fact_tracing": recall,
            "num_queries": int(len(set(result.column("query_id").to_pylist()))),
            "baselines": baselines,
        }
        write_json(ctx.paths.summary, summary)
        report(ctx)
        ctx.tracker.artifact(f"{ctx.paths.root.name}-results", "results", [ctx.paths.summary, ctx.paths.report])
        ctx.tracker.summary(_wandb_summary(summary))
    finally:
        ctx.close()  # the tracker, and the Ray session and worker group of a distributed run
    return RunResult(summary, result, ctx.queries)
