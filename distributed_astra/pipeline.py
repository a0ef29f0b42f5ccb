"""The pipeline: the stages in order, each one driver (stages/) reading the previous stage's artifacts through the
run context (context.py) and running its rank functions on the context's executor (in process, or a Ray worker
group under DeepSpeed when `ray.num_workers > 1`: execution.py).

    prepare -> fit -> query -> solve -> score -> report    (`run` does them all, plus solver.baselines)
    index / search                                        (projected gradient store + faiss, index/stages.py)
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distributed_astra.artifacts import meta_matches, open_tensors, read_meta, write_json
from distributed_astra.config import SOURCE_SOLVERS, Config
from distributed_astra.context import Context, factor_meta, open_context, query_gradient_shards, query_meta
from distributed_astra.curvature.factors import factor_fields, factor_shards
from distributed_astra.data.sequences import load_queries
from distributed_astra.errors import DastraError
from distributed_astra.eval.recall import fact_recall
from distributed_astra.ihvp.monitor import heldout_summary
from distributed_astra.progress import console
from distributed_astra.stages import solve as solve_stage
from distributed_astra.stages import source as source_stage
from distributed_astra.stages.fit import fit
from distributed_astra.stages.query import query
from distributed_astra.stages.score import score
from distributed_astra.tracking import metered

__all__ = ["fit", "query", "solve", "score", "index", "search", "report", "run"]


def reused(ctx: Context, name: str) -> tuple[bool, object]:
    """`dastra run` and `dastra eval facts` reuse fit's and query's artifacts when they were made for the same model,
    corpus and settings (their meta.json agrees with what the stage would write), as the single stages check before
    reading them: (reused, None)."""
    if name == "fit":
        expected = {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype}
        if meta_matches(ctx.paths.factors, expected):
            return _shards_readable(lambda: factor_shards(ctx.paths.factors), "EK-FAC factors", "fit",
                                    "reusing factors/ (same model, corpus and factors settings)", "fitting again")
    if name == "query" and meta_matches(ctx.paths.queries, query_meta(ctx)):
        return _shards_readable(
            lambda: [ctx.paths.queries / f for f in set(query_gradient_shards(ctx.paths.queries).values())],
            "query gradients", "query", "reusing queries/ (same model and queries)", "computing them again",
        )
    return False, None


def _shards_readable(
    shards: Callable[[], list[Path]], what: str, stage: str, reused: str, otherwise: str
) -> tuple[bool, None]:
    """(True, None) with `reused` printed when every shard of a matching artifact opens (its tensors stay on
    disk); else a warning naming the damage and `otherwise`, and (False, None)."""
    try:
        for shard in shards():
            with open_tensors(shard, what, stage):
                pass
    except DastraError as exc:
        console.print(f"[yellow]warning:[/] {exc}: {otherwise}", highlight=False, soft_wrap=True)
        return False, None
    console.print(reused, highlight=False)
    return True, None


def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f for every query with `solver.name` (stages/solve.py, seeds §3-5); `source` / `astra-source` per
    segment of the training trajectory (stages/source.py, seeds §6-7). Returns the damping λ used."""
    return (source_stage if ctx.cfg.solver.name in SOURCE_SOLVERS else solve_stage).solve(ctx)


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

    for shard in factor_shards(ctx.paths.factors):  # the spectra come last: a missing or damaged factors file
        with open_tensors(shard, "EK-FAC factors", "fit"):  # is refused before the attribution pass
            pass
    return build_report(ctx)


def _log_stage_result(ctx: Context, name: str, result: object, seconds: float) -> None:
    """W&B views of a finished stage (its seconds, memory and throughput come from `metered`): the eigen-spectrum
    (log10 Λ) per module after fit; the top-k table of the scoring method under score/<method>/topk."""
    if name == "fit":
        for module, fields in factor_fields(ctx.paths.factors, ["lambda_"]):
            ctx.tracker.histogram(f"fit/spectrum/{module}", torch.log10(fields["lambda_"].clamp_min(1e-30)))
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
