"""The `report` stage: per-token attribution of each shown query's top-k documents, then `report.html`.

Reads (under `output.run_dir`): `topk.parquet`, `ihvp/<solver.name>/directions.safetensors` (the directions that
scored it; SOURCE: its per-segment directions and the trajectory's checkpoints), every `ihvp/*/meta.json` and `trace.parquet`, `factors/` (eigenvalues only), `summary.json` and
`scores/dense.parquet` when present. Writes `token_scores.parquet` (query_id, rank, doc_id, score, token_ids,
token_scores: the per-token terms, which sum to the score) and the self-contained `report.html`, both atomically.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import distributed_astra
from distributed_astra.artifacts import atomic_path, check_meta, load_tensors
from distributed_astra.context import Context
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import factor_fields, load_factors_meta
from distributed_astra.data.sequences import QueryId, iter_training_batches, load_queries
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.monitor import heldout_summary
from distributed_astra.progress import progress_bar
from distributed_astra.report import plots
from distributed_astra.report.segments import Segment, best_window, token_segments
from distributed_astra.scoring.low_rank import LowRank, stored_direction
from distributed_astra.scoring.tokens import document_token_scores
from distributed_astra.source.trajectory import Trajectory, load_trajectory, weights
from distributed_astra.stages.score import scoring_passes
from distributed_astra.tracking import relative_to_start

TEMPLATE = "template.html.j2"
SUM_TOLERANCE = 1e-3  # |Σ terms − score| / Σ|terms|: far above float32 round-off, far below a mismatched artifact
MAX_ALPHA = 0.75


@dataclass(frozen=True)
class ShownDocument:
    query_id: QueryId
    rank: int
    doc_id: int | str
    score: float
    text: str


def _read_topk(path: Path) -> pa.Table:
    if not path.is_file():
        raise DastraError(f"top-k scores not found at '{path}': run `dastra score` first")
    table = pq.read_table(path)
    missing = {"query_id", "rank", "doc_id", "score", "text"} - set(table.column_names)
    if missing:
        raise DastraError(f"{path} lacks column(s) {sorted(missing)}: re-run `dastra score`")
    return table


def _shown_documents(topk: pa.Table, num_queries: int) -> tuple[list[QueryId], list[ShownDocument]]:
    """The first `num_queries` queries of the top-k table (in its order) and their documents, best first."""
    shown = pc.unique(topk.column("query_id")).to_pylist()[:num_queries]
    rows = topk.filter(pc.is_in(topk.column("query_id"), value_set=pa.array(shown, topk.schema.field("query_id").type)))
    order = {q: i for i, q in enumerate(shown)}
    documents = [ShownDocument(**r) for r in rows.select(["query_id", "rank", "doc_id", "score", "text"]).to_pylist()]
    return shown, sorted(documents, key=lambda d: (order[d.query_id], d.rank))


def _load_directions(
    ctx: Context, query_ids: list[QueryId]
) -> tuple[Trajectory | None, list[tuple[int | None, dict[str, torch.Tensor]]]]:
    """The scoring solver's directions of `query_ids`, in that order, as scoring held them (`stored_direction`:
    low-rank and bfloat16 storage included), whole in the scoring compute dtype, as (trajectory checkpoint,
    directions) passes whose terms add up (stages/score.py's `scoring_passes`): one pass at the loaded model
    (None), or one per checkpoint for source | astra-source, with their trajectory."""
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    solver_dir = ctx.paths.ihvp(ctx.cfg.solver.name)
    ids, trajectory, passes = scoring_passes(ctx)
    position = {q: i for i, q in enumerate(ids)}
    absent = [q for q in query_ids if q not in position]
    if absent:
        raise DastraError(
            f"topk.parquet has queries {absent[:5]} that {solver_dir} has no direction for: "
            f"re-run `dastra score --solver {ctx.cfg.solver.name}`"
        )
    index = torch.tensor([position[q] for q in query_ids])
    traj = load_trajectory(trajectory) if trajectory is not None else None
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for p in passes:
        if p.file not in loaded:
            loaded[p.file] = {name: x[index] for name, x in load_tensors(Path(p.file), "solved directions",
                                                                         "solve").items()}

    def held(x: torch.Tensor) -> torch.Tensor:
        d = stored_direction(x, ctx.cfg.scoring, compute)
        return d.dense(compute) if isinstance(d, LowRank) else d.to(compute)

    return traj, [(p.checkpoint, {name: held(x * p.scale) for name, x in loaded[p.file].items()}) for p in passes]


def attribute_tokens(ctx: Context, documents: list[ShownDocument], query_ids: list[QueryId]) -> pa.Table:
    """Second pass over the shown top-k documents only: the per-token terms of every (query, document) pair.

    The documents are written to a temporary Parquet file and cut into sequences by the same corpus reader that
    scoring uses, so token ids and sequences are identical. Raises when a document's terms do not add up to its
    score in `topk.parquet` (the scores then came from other directions or another model). SOURCE's terms are the
    sum of one such pass per trajectory checkpoint, the model at that checkpoint's weights.
    """
    traj, passes = _load_directions(ctx, query_ids)
    query_index = {q: i for i, q in enumerate(query_ids)}
    local_key = {doc_id: i for i, doc_id in enumerate(dict.fromkeys(d.doc_id for d in documents))}
    wanted: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    for doc in documents:
        wanted.setdefault(local_key[doc.doc_id], []).append(query_index[doc.query_id])
        texts[local_key[doc.doc_id]] = doc.text
    with tempfile.TemporaryDirectory(prefix="dastra-report-") as tmp:
        subset = Path(tmp) / "documents.parquet"
        pq.write_table(pa.table({"key": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), subset)
        token_lists: dict[tuple[int, int], list[int]] = {}
        summed: dict[tuple[int, int], torch.Tensor] = {}
        with progress_bar("per-token attribution", len(texts) * len(passes), "docs") as advance:
            for checkpoint, directions in passes:
                batches = iter_training_batches(
                    subset,
                    ctx.tokenizer,
                    ctx.sequence_format,
                    ctx.cfg.scoring.batch_size,
                    text_column="text",
                    id_column="key",
                )
                seen: set[int] = set()

                def counted(batches=batches, seen=seen):
                    for batch in batches:
                        yield batch
                        new = set(batch["doc_id"].tolist()) - seen
                        seen.update(new)
                        advance(len(new))

                with weights(ctx.model, traj.state(checkpoint) if traj is not None else None):
                    pairs = document_token_scores(
                        ctx.model, ctx.tracked, counted(), directions, wanted, product_dtype(ctx.model, ctx.stat_dtype)
                    )
                for key, entry in pairs.items():
                    token_lists[key] = entry.token_ids
                    summed[key] = summed[key] + entry.terms if key in summed else entry.terms
            token_ids, token_scores = [], []
            for doc in documents:
                key = (query_index[doc.query_id], local_key[doc.doc_id])
                terms = summed[key]
                if abs(float(terms.sum()) - doc.score) > SUM_TOLERANCE * float(terms.abs().sum()) + 1e-12:
                    raise DastraError(
                        f"topk.parquet: document {doc.doc_id} of query {doc.query_id} has score {doc.score:.6g} but "
                        f"its per-token terms under solver '{ctx.cfg.solver.name}' sum to {float(terms.sum()):.6g}; "
                        f"the top-k came from other directions: re-run `dastra score --solver {ctx.cfg.solver.name}`"
                    )
                token_ids.append(token_lists[key])
                token_scores.append(terms.tolist())
    return pa.table(
        {
            "query_id": pa.array([d.query_id for d in documents]),
            "rank": pa.array([d.rank for d in documents], pa.int64()),
            "doc_id": pa.array([d.doc_id for d in documents]),
            "score": pa.array([d.score for d in documents], pa.float64()),
            "token_ids": pa.array(token_ids, pa.list_(pa.int64())),
            "token_scores": pa.array(token_scores, pa.list_(pa.float64())),
        }
    )


# --------------------------------------------------------------------------------------------------------- views
def _segment_view(segment: Segment, total: float, largest: float) -> dict[str, object]:
    share = segment.term / total if total > 0 else 0.0
    classes = ("pos" if segment.term >= 0 else "neg") + (" special" if segment.special else "")
    return {
        "text": segment.text if not segment.special else segment.text or "⟨special⟩",
        "cls": classes,
        "alpha": f"{MAX_ALPHA * abs(segment.term) / largest:.3f}" if largest > 0 else "0",
        "title": f"term {segment.term:+.4g} ({share:+.1%} of Σ|term|)",
    }


def _document_view(
    tokenizer, doc: ShownDocument, token_ids: list[int], terms: np.ndarray, max_tokens: int,
    fact_doc_id: int | str | None,
) -> dict[str, object]:
    """One top-k row: the `max_tokens` pieces with the most |term| mass, each with its colour, opacity and tooltip."""
    segments = token_segments(tokenizer, doc.text, token_ids, terms)
    magnitudes = np.abs(np.array([s.term for s in segments]))
    start, stop = best_window(magnitudes, max_tokens)
    total, largest = float(magnitudes.sum()), float(magnitudes.max(initial=0.0))
    return {
        "rank": doc.rank,
        "doc_id": doc.doc_id,
        "score": doc.score,
        "is_fact": fact_doc_id == doc.doc_id,
        "segments": [_segment_view(s, total, largest) for s in segments[start:stop]],
        "cut_before": start > 0,
        "cut_after": stop < len(segments),
        "window_start": start,
        "window_stop": stop,
        "num_tokens": len(segments),
        "window_mass": float(magnitudes[start:stop].sum()) / total if total > 0 else 1.0,
    }


def _solver_runs(ctx: Context) -> list[dict[str, object]]:
    """Every solve found under ihvp/: name, damping, status counts, iterations, its trace (None for ekfac), its
    held-out evaluation (heldout.parquet, None without one) with its summary figures, and its solver settings."""
    runs = []
    for folder in sorted(p for p in (ctx.paths.root / "ihvp").glob("*") if (p / "meta.json").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        trace_path = folder / "trace.parquet"
        trace = heldout = None
        if trace_path.is_file():
            table = pq.read_table(trace_path, columns=["query_id", "repeat", "iteration", "objective", "residual", "status"])
            trace = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        held_summary: dict[str, object] = {}
        if (folder / "heldout.parquet").is_file():
            table = pq.read_table(folder / "heldout.parquet")
            held_summary = heldout_summary(table, meta.get("heldout"))
            heldout = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        runs.append(
            {
                "name": folder.name,
                "damping": float(meta.get("damping", float("nan"))),
                "status": meta.get("status", {}),
                "iterations": int(trace["iteration"].max()) + 1 if trace is not None and len(trace["iteration"]) else 0,
                "trace": trace,
                "heldout": heldout,
                "heldout_summary": held_summary,
                "settings": meta.get("solver", {}),
            }
        )
    return runs


# ------------------------------------------------------------------------------------- convergence, methods
STILL_FALLING = 0.01  # |median (h_K − h_prev)/|h_0|| above this over the last held-out interval: not levelled off


def convergence_verdict(held: dict[str, object]) -> str:
    """One sentence a reader can act on, from a solve's held-out figures (ihvp.monitor.heldout_summary)."""
    if not held:
        return ("no held-out evaluation (solver.heldout_every: 0 or an older run): only the noisy minibatch h "
                "is available, which cannot tell whether the solve converged.")
    first, last = held["heldout_objective_first_mean"], held["heldout_objective_last_mean"]
    share = held["heldout_decreased_fraction"]
    tail = held["heldout_last_interval_change_median"]
    measured = f"mean held-out h {first:.4g} → {last:.4g}, lower for {share:.0%} of the queries"
    if not held["heldout_decreased"]:
        return (f"did NOT decrease on the held-out batch ({measured}): the iterations did not improve on the "
                "start; lower solver.lr or raise solver.damping.")
    if tail < -STILL_FALLING:
        return (f"decreased ({measured}) and was still falling over the last interval (median {tail:+.1%} of |h₀|): "
                "more iterations would likely lower it further.")
    return (f"decreased ({measured}) and levelled off over the last interval (median {tail:+.1%} of |h₀|): more "
            "iterations would help little.")


def _convergence_view(runs: list[dict]) -> tuple[dict | None, list[dict]]:
    """The convergence figure (held-out median and band per iterative method) and one verdict per method."""
    iterative = [run for run in runs if run["trace"] is not None]
    if not iterative:
        return None, []
    methods, verdicts = {}, []
    for run in iterative:
        data: dict[str, object] = {"queries": len(set(run["trace"]["query_id"].tolist()))}
        for key in ("trace", "heldout"):
            rows = run[key]
            if rows is None:
                data[key] = None
                continue
            change, ratio = relative_to_start(rows)
            data[key] = {"iteration": rows["iteration"], "change": change, "ratio": ratio}
        methods[run["name"]] = data
        info = run["heldout_summary"]
        verdicts.append({
            "name": run["name"], "text": convergence_verdict(info),
            "every": info.get("heldout_every"), "batch_size": info.get("heldout_batch_size"),
            "cost": info.get("heldout_cost_fraction"),
        })
    figure = {
        "key": "convergence",
        "title": "Solver convergence",
        "caption": "Relative change of the objective h(x) = ½xᵀ(G̃ + λI)x − ∇fᵀx from its start (lower is better) "
        "and the residual ratio ‖(G̃ + λI)x − ∇f‖ / ‖r₀‖, measured on ONE fixed held-out curvature batch at the "
        "start, every solver.heldout_every iterations and at the end: median over queries (bold) and p10-p90 band. "
        "Grey dashed: the median on each iteration's own minibatch, which zig-zags because G̃ changes every iteration.",
        "png": plots.convergence_bands(methods),
    }
    return figure, verdicts


def _method_rows(summary: dict) -> list[dict[str, object]]:
    """summary.json's figures per method, solver.name first then solver.baselines: fact tracing, objective, held-out
    objective, seconds; side by side in the report."""
    if not summary.get("fact_tracing"):
        return []
    primary = {k: v for k, v in summary.items() if k not in ("baselines", "solver")}
    methods = [(summary.get("solver", "?"), primary), *summary.get("baselines", {}).items()]
    rows = []
    for name, values in methods:
        facts = values.get("fact_tracing", {})
        seconds = values.get("seconds", {})
        rows.append({
            "name": name,
            "primary": name == summary.get("solver"),
            "recall1": facts.get("recall@1"),
            "recall10": facts.get("recall@10"),
            "mrr": facts.get("mrr"),
            "num_fact_queries": facts.get("num_fact_queries"),
            "solve_seconds": seconds.get("solve"),
            "score_seconds": seconds.get("score"),
            "objective_first": values.get("objective_first_mean"),
            "objective_last": values.get("objective_last_mean"),
            "heldout_first": values.get("heldout_objective_first_mean"),
            "heldout_last": values.get("heldout_objective_last_mean"),
            "heldout_decreased": values.get("heldout_decreased"),
            "status": values.get("status", {}),
        })
    return rows


def _settings_rows(ctx: Context, runs: list[dict]) -> list[tuple[str, str]]:
    """The settings that decide the result, as (label, value) rows: per solve its damping and solver settings, then
    the tracked modules, the factors and the sequences."""
    rows: list[tuple[str, str]] = []
    for run in runs:
        cfg = run["settings"]
        if run["trace"] is None:
            rows.append((f"{run['name']}", f"direct solve (P + λI)⁻¹∇f, λ = {run['damping']:.4g}"))
            continue
        lr = {"auto": "α = lr / μ̂", "relative": "α = lr × λ", "absolute": "α = lr"}.get(cfg.get("lr_mode"), "")
        parts = [
            f"λ = {run['damping']:.4g} (solver.damping: {cfg.get('damping')})",
            f"{cfg.get('iterations')} iterations",
            f"minibatch {cfg.get('minibatch_size')} sequences ({cfg.get('product')} product)",
            f"lr {cfg.get('lr')} ({cfg.get('lr_mode')}: {lr}), momentum {cfg.get('momentum')}, "
            f"decay ×{cfg.get('lr_decay')} every {cfg.get('lr_decay_every')}",
            f"{cfg.get('query_batch_size')} queries per chunk",
        ]
        if cfg.get("preconditioner_damping") is not None:
            parts.append(f"λ̃ = {cfg['preconditioner_damping']}")
        if cfg.get("heldout_every"):
            info = run["heldout_summary"]
            cost = info.get("heldout_cost_fraction")
            parts.append(
                f"held-out batch {info.get('heldout_batch_size', cfg.get('heldout_batch_size'))} sequences every "
                f"{cfg.get('heldout_every')} iterations" + (f" ({cost:.1%} of the solve)" if cost is not None else "")
            )
        rows.append((run["name"], "; ".join(parts)))
    factors = ctx.cfg.factors
    rows.append(("tracked modules", f"{len(ctx.tracked)}: " + ", ".join(ctx.tracked)))
    rows.append(("factors", f"{factors.strategy}, {factors.dtype} statistics, "
                 f"{factors.max_sequences or 'all'} sequences per pass"))
    rows.append(("sequences", f"data.max_length {ctx.cfg.data.max_length} tokens"))
    return rows


def _spectra(ctx: Context) -> dict[str, dict[str, np.ndarray]]:
    """Λ and the eigenvalues of A and S per module, read one tensor at a time (the eigenvectors stay on disk)."""
    meta = load_factors_meta(ctx.paths.factors)
    check_meta(meta, ctx.model_meta(), f"factors at '{ctx.paths.factors}'", "fit")
    spectra = {}
    keys = {"lambda": "lambda_", "a": "eigval_a", "s": "eigval_s"}
    for name, fields in factor_fields(ctx.paths.factors, keys.values()):
        spectra[name] = {field: fields[key].double().flatten().numpy() for field, key in keys.items()}
    return spectra


def _plots(ctx: Context, topk: pa.Table, shown: list[int], runs: list[dict]) -> tuple[list[dict], list[str]]:
    figures, notes = [], []
    dense_path = ctx.paths.scores / "dense.parquet"
    stored = pq.read_schema(dense_path).names if dense_path.is_file() else []
    columns = [f"q{q}" for q in shown if f"q{q}" in stored]
    if columns:
        dense = pq.read_table(dense_path, columns=columns)
        values = np.concatenate([dense.column(i).to_numpy() for i in range(dense.num_columns)])
        source = f"all {dense.num_rows} documents × {len(columns)} shown queries"
    else:
        values = topk.column("score").to_numpy()
        source = "the top-k documents of every query"
        notes.append("The score histogram covers the top-k only; scoring.dense: true records every document's score.")
    by_rank = plots.stack_by_rank(
        topk.column("query_id").to_pylist(), topk.column("rank").to_pylist(), topk.column("score").to_pylist()
    )
    figures.append(
        {
            "key": "scores",
            "title": "Score distribution",
            "caption": f"Histogram of {source} (log count), and each query's top-k scores by rank relative to its best.",
            "png": plots.score_distribution(values, source, by_rank),
        }
    )
    exact = [run["name"] for run in runs if run["trace"] is None]
    if exact:
        notes.append(f"Solver(s) {', '.join(exact)}: direct EK-FAC solve, no iterations to plot.")
    if (ctx.paths.factors / "meta.json").is_file():
        dampings: dict[str, float] = {}
        for run in runs:
            label = next((k for k, v in dampings.items() if v == run["damping"]), None)
            if label is None:
                dampings[run["name"]] = run["damping"]
            else:
                dampings[f"{label}, {run['name']}"] = dampings.pop(label)
        figures.append(
            {
                "key": "spectra",
                "title": "EK-FAC eigen-spectra",
                "caption": "Sorted eigenvalues per tracked module (colour: module order). Eigen-directions whose Λ "
                "lies below the damping λ (dashed) are dominated by it.",
                "png": plots.eigen_spectra(_spectra(ctx), dampings),
            }
        )
    else:
        notes.append("No factors/ in this run directory: the eigen-spectra need `dastra fit`.")
    return figures, notes


def build_report(ctx: Context) -> Path:
    """Write `token_scores.parquet` and `report.html` into the run directory; returns the report's path."""
    cfg = ctx.cfg.report
    root = ctx.paths.root
    topk = _read_topk(ctx.paths.topk)
    shown, documents = _shown_documents(topk, cfg.num_queries)
    token_table = attribute_tokens(ctx, documents, shown)
    with atomic_path(root / "token_scores.parquet") as tmp:
        pq.write_table(token_table, tmp)

    queries = {q.query_id: q for q in load_queries(ctx.queries)}
    by_query: dict[int, list[dict]] = {q: [] for q in shown}
    for doc, ids, terms in zip(
        documents, token_table.column("token_ids").to_pylist(), token_table.column("token_scores").to_pylist()
    ):
        fact = queries[doc.query_id].fact_doc_id if doc.query_id in queries else None
        by_query[doc.query_id].append(_document_view(ctx.tokenizer, doc, ids, np.array(terms), cfg.max_tokens, fact))
    query_views = []
    for q in shown:
        query = queries.get(q)
        fact = query.fact_doc_id if query else None
        query_views.append(
            {
                "query_id": q,
                "prompt": query.prompt if query else "",
                "completion": query.completion if query else "",
                "fact_doc_id": fact,
                "fact_rank": next((d["rank"] for d in by_query[q] if d["doc_id"] == fact), None),
                "documents": by_query[q],
            }
        )

    runs = _solver_runs(ctx)
    figures, notes = _plots(ctx, topk, shown, runs)
    convergence_plot, verdicts = _convergence_view(runs)
    summary = json.loads(ctx.paths.summary.read_text()) if ctx.paths.summary.is_file() else {}
    scoring_run = next((r for r in runs if r["name"] == ctx.cfg.solver.name), None)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    html = environment.get_template(TEMPLATE).render(
        run_name=root.name,
        run_dir=str(root),
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=distributed_astra.__version__,
        solver=ctx.cfg.solver.name,
        damping=scoring_run["damping"] if scoring_run else float("nan"),
        num_queries_total=pc.count_distinct(topk.column("query_id")).as_py(),
        top_k=pc.max(topk.column("rank")).as_py() or 0,
        fingerprint=ctx.fingerprint,
        tracked_modules=list(ctx.tracked),
        solvers=[{k: v for k, v in r.items() if k not in ("trace", "heldout")} for r in runs],
        methods=_method_rows(summary),
        convergence_plot=convergence_plot,
        verdicts=verdicts,
        settings=_settings_rows(ctx, runs),
        fact_tracing={k: v for k, v in summary.get("fact_tracing", {}).items() if k != "num_fact_queries"},
        summary_solver=summary.get("solver", "?"),
        seconds=summary.get("seconds", {}),
        max_tokens=cfg.max_tokens,
        plots=figures,
        plot_notes=notes,
        queries=query_views,
    )
    path = ctx.paths.report
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    ctx.tracker.log({"report/num_queries": len(shown), "report/num_documents": len(documents)})
    return path
