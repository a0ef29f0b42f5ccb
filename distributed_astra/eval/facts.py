"""Fact tracing: does the planted document of a fact query rank near the top of its attribution?"""

from __future__ import annotations

import time
from collections.abc import Callable

from distributed_astra import pipeline
from distributed_astra.config import Config, SolverConfig, eval_solver
from distributed_astra.context import Context, open_context
from distributed_astra.curvature.factors import stored_mean_lambda
from distributed_astra.data.sequences import load_queries
from distributed_astra.errors import DastraError
from distributed_astra.eval.recall import fact_recall

# Fact tracing per method through the pipeline's own stages: method -> (label, solver overrides).
FACT_METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "graddot": ("grad-dot", {"name": "sni", "iterations": 0}),  # SNI's x0 = ∇f: the iHVP replaced by the identity
    "ekfac": ("EK-FAC-IF", {"name": "ekfac"}),
    "sni": ("SNI-IF", {"name": "sni"}),
    "astra": ("ASTRA-IF", {"name": "astra"}),
}


ITERATIVE = ("sni", "astra")


def fact_solver(cfg: Config, method: str, mean_lambda: Callable[[], float]) -> SolverConfig:
    """The solver settings of one fact-tracing method: `config.eval_solver` (as `eval lds`) with the method's own
    overrides; with `solver.damping: auto` the iterative solvers take λ = eval.damping_scale × mean(Λ)."""
    _, overrides = FACT_METHODS[method]
    if method in ITERATIVE and cfg.solver.damping == "auto":
        overrides = {**overrides, "damping": cfg.eval.damping_scale * mean_lambda()}
    return eval_solver(cfg, **overrides)


def _fitted(ctx: Context) -> float:
    """The run directory's factors and query gradients, reused when their metadata match, else computed; returns
    the factors' mean Λ."""
    if not pipeline.reused(ctx, "fit")[0]:
        pipeline.fit(ctx)
    if not pipeline.reused(ctx, "query")[0]:
        pipeline.query(ctx)
    return stored_mean_lambda(ctx.paths.factors)


def check_fact_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in FACT_METHODS]
    if unknown or not methods:
        name = unknown[0] if unknown else ""
        raise DastraError(f"fact-tracing method '{name}' is unknown; valid methods: {', '.join(FACT_METHODS)}")


def trace_facts(cfg: Config, methods: list[str]) -> dict:
    """recall@1, recall@10 and MRR of the planted documents for each method, on `cfg`'s corpus and model.

    One context (`context.open_context`) serves every method: its factors and query gradients are fitted once
    (reused from the run directory when their metadata match, `pipeline.reused`), then each method solves and
    scores with `fact_solver`'s settings (`config.eval_solver`: the run's `solver` with `eval.solver` on top, as
    `eval lds`). With `solver.damping: auto`, EK-FAC keeps the solver's λ (0.1 × mean Λ) and the iterative solvers
    use the LDS evidence's λ = eval.damping_scale × mean(Λ) (docs/design.md, "Damping"). The recalls
    go to the context's tracker (metrics.jsonl of the run directory and W&B) as facts/<method>/<metric>.
    """
    check_fact_methods(methods)
    rows = []
    ctx = open_context(cfg, "eval-facts")
    try:
        mean_lambda = _fitted(ctx)
        for method in methods:
            label = FACT_METHODS[method][0]
            solver = fact_solver(cfg, method, lambda: mean_lambda)
            ctx.cfg = ctx.cfg.model_copy(update={"solver": solver})
            start = time.perf_counter()
            pipeline.solve(ctx)
            recall = fact_recall(pipeline.score(ctx), load_queries(ctx.queries))
            settings = "x = ∇f" if method == "graddot" else (
                f"λ = {solver.damping}" if method == "ekfac" else
                f"λ = {solver.damping:.3g}, {solver.iterations} it, ℬ {solver.minibatch_size}, lr {solver.lr:g} "
                f"({solver.lr_mode})")
            row = {"method": method, "label": label, "settings": settings, **recall,
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            ctx.tracker.log({f"facts/{method}/{k}": v for k, v in recall.items()})
    finally:
        ctx.close()
    return {"rows": rows, "num_fact_queries": rows[0]["num_fact_queries"] if rows else 0}
