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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distributed_astra
from distributed_astra.artifacts import atomic_path, check_meta, read_meta
from distributed_astra.config import SOURCE_SOLVERS
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import FACTORS_FILE, load_factors_meta
from distributed_astra.data.sequences import iter_training_batches, load_queries
from distributed_astra.errors import DastraError
from distributed_astra.progress import progress_bar
from distributed_astra.report import plots
from distributed_astra.report.segments import Segment, best_window, token_segments
from distributed_astra.scoring.tokens import document_token_scores
from distributed_astra.source.stages import scoring_passes, weights
from distributed_astra.source.trajectory import Trajectory

if TYPE_CHECKING:
    from distributed_astra.pipeline import Context

TEMPLATE = "template.html.j2"
SUM_TOLERANCE = 1e-3  # |Σ terms − score| / Σ|terms|: far above float32 round-off, far below a mismatched artifact
MAX_ALPHA = 0.75


@dataclass(frozen=True)
class ShownDocument:
    query_id: int
    rank: int
    doc_id: int
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


def _shown_documents(topk: pa.Table, num_queries: int) -> tuple[list[int], list[ShownDocument]]:
    """The first `num_queries` queries of the top-k table (in its order) and their documents, best first."""
    shown = pc.unique(topk.column("query_id")).to_pylist()[:num_queries]
    rows = topk.filter(pc.is_in(topk.column("query_id"), value_set=pa.array(shown, topk.schema.field("query_id").type)))
    order = {q: i for i, q in enumerate(shown)}
    documents = [ShownDocument(**r) for r in rows.select(["query_id", "rank", "doc_id", "score", "text"]).to_pylist()]
    return shown, sorted(documents, key=lambda d: (order[d.query_id], d.rank))


def _load_directions(
    ctx: Context, query_ids: list[int]
) -> tuple[Trajectory | None, list[tuple[int | None, dict[str, torch.Tensor]]]]:
    """The scoring solver's directions of `query_ids`, in that order, in the scoring compute dtype, as
    (trajectory checkpoint, directions) passes whose terms add up: one pass at the loaded model (None), or one
    per checkpoint for source | astra-source (source/stages.py), with their trajectory."""
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    solver_dir = ctx.paths.ihvp(ctx.cfg.solver.name)
    if ctx.cfg.solver.name in SOURCE_SOLVERS:
        ids, traj, passes = scoring_passes(ctx, compute)
        sets = [(p.checkpoint, p.directions) for p in passes]
    else:
        check_meta(read_meta(solver_dir, "solved directions", "solve"), ctx.model_meta(), "solved directions", "solve")
        tensors = load_file(str(solver_dir / "directions.safetensors"))
        ids, traj = tensors.pop("query_ids"), None
        sets = [(None, {name: x.to(compute) for name, x in tensors.items()})]
    position = {q: i for i, q in enumerate(ids.tolist())}
    absent = [q for q in query_ids if q not in position]
    if absent:
        raise DastraError(
            f"topk.parquet has queries {absent[:5]} that {solver_dir} has no direction for: "
            f"re-run `dastra score --solver {ctx.cfg.solver.name}`"
        )
    index = torch.tensor([position[q] for q in query_ids])
    return traj, [(checkpoint, {name: x[index] for name, x in d.items()}) for checkpoint, d in sets]


def attribute_tokens(ctx: Context, documents: list[ShownDocument], query_ids: list[int]) -> pa.Table:
    """Second pass over the shown top-k documents only: the per-token terms of every (query, document) pair.

    The documents are written to a temporary Parquet file and cut into sequences by the same corpus reader that
    scoring uses, so token ids and sequences are identical. Raises when a document's terms do not add up to its
    score in `topk.parquet` (the scores then came from other directions or another model). SOURCE's terms are the
    sum of one such pass per trajectory checkpoint, the model at that checkpoint's weights.
    """
    traj, passes = _load_directions(ctx, query_ids)
    query_index = {q: i for i, q in enumerate(query_ids)}
    wanted: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    for doc in documents:
        wanted.setdefault(doc.doc_id, []).append(query_index[doc.query_id])
        texts[doc.doc_id] = doc.text
    with tempfile.TemporaryDirectory(prefix="dastra-report-") as tmp:
        subset = Path(tmp) / "documents.parquet"
        pq.write_table(pa.table({"doc_id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), subset)
        token_lists: dict[tuple[int, int], list[int]] = {}
        summed: dict[tuple[int, int], torch.Tensor] = {}
        with progress_bar("per-token attribution", len(texts) * len(passes), "docs") as advance:
            for checkpoint, directions in passes:
                batches = iter_training_batches(
                    subset,
                    ctx.tokenizer,
                    ctx.cfg.data.max_length,
                    ctx.cfg.scoring.batch_size,
                    text_column="text",
                    id_column="doc_id",
                )
                seen: set[int] = set()

                def counted(batches=batches, seen=seen):
                    for batch in batches:
                        yield batch
                        new = set(batch["doc_id"].tolist()) - seen
                        seen.update(new)
                        advance(len(new))

                at = nullcontext() if checkpoint is None else weights(ctx.model, traj.state(checkpoint))
                with at:
                    pairs = document_token_scores(
                        ctx.model, ctx.tracked, counted(), directions, wanted, product_dtype(ctx.model, ctx.stat_dtype)
                    )
                for key, entry in pairs.items():
                    token_lists[key] = entry.token_ids
                    summed[key] = summed[key] + entry.terms if key in summed else entry.terms
            token_ids, token_scores = [], []
            for doc in documents:
                key = (query_index[doc.query_id], doc.doc_id)
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
            "query_id": pa.array([d.query_id for d in documents], pa.int64()),
            "rank": pa.array([d.rank for d in documents], pa.int64()),
            "doc_id": pa.array([d.doc_id for d in documents], pa.int64()),
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
    tokenizer, doc: ShownDocument, token_ids: list[int], terms: np.ndarray, max_tokens: int, fact_doc_id: int | None
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
    """Every solve found under ihvp/: name, damping, status counts, iterations and its trace (None for ekfac)."""
    runs = []
    for folder in sorted(p for p in (ctx.paths.root / "ihvp").glob("*") if (p / "meta.json").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        trace_path = folder / "trace.parquet"
        trace = None
        if trace_path.is_file():
            table = pq.read_table(trace_path, columns=["query_id", "repeat", "iteration", "objective", "residual", "status"])
            trace = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        runs.append(
            {
                "name": folder.name,
                "damping": float(meta.get("damping", float("nan"))),
                "status": meta.get("status", {}),
                "iterations": int(trace["iteration"].max()) + 1 if trace is not None and len(trace["iteration"]) else 0,
                "trace": trace,
            }
        )
    return runs


def _spectra(ctx: Context) -> dict[str, dict[str, np.ndarray]]:
    """Λ and the eigenvalues of A and S per module, read one tensor at a time (the eigenvectors stay on disk)."""
    meta = load_factors_meta(ctx.paths.factors)
    check_meta(meta, ctx.model_meta(), f"factors at '{ctx.paths.factors}'", "fit")
    spectra = {}
    with safe_open(str(ctx.paths.factors / FACTORS_FILE), framework="pt") as handle:
        for name in meta["ekfac"]["modules"]:
            spectra[name] = {
                field: handle.get_tensor(f"{name}/{key}").double().flatten().numpy()
                for field, key in (("lambda", "lambda_"), ("a", "eigval_a"), ("s", "eigval_s"))
            }
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
    traced = {run["name"]: run["trace"] for run in runs if run["trace"] is not None}
    if traced:
        figures.append(
            {
                "key": "convergence",
                "title": "Solver convergence",
                "caption": "Objective h(x) = ½xᵀ(G̃ + λI)x − ∇fᵀx relative to its start (lower is better) and the "
                "residual ‖(G̃ + λI)x − ∇f‖, per query on each iteration's minibatch; red: diverged (falls back to EK-FAC).",
                "png": plots.convergence(traced),
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
        solvers=[{k: v for k, v in r.items() if k != "trace"} for r in runs],
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
