"""The report's figures (matplotlib, Agg canvas, no pyplot state), returned as base64 PNG for embedding.

Each function draws from plain arrays so that it can run on a laptop over the artifacts of a cluster run:
large spectra are subsampled on log-spaced ranks, and convergence is drawn as a median and band over queries.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

POSITIVE_COLOUR = "#2166ac"
NEGATIVE_COLOUR = "#d6604d"
MAX_SPECTRUM_POINTS = 400
MAX_LEGEND_ENTRIES = 8
MAX_LINES = 200  # per-query lines drawn per panel; medians cover every query
SPECTRUM_FLOOR = 1e-12  # eigenvalues below this fraction of the largest are round-off: not drawn


def figure_png(figure: Figure, dpi: int = 100) -> str:
    """The figure as a base64-encoded PNG (for `<img src="data:image/png;base64,...">`)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def score_distribution(scores: np.ndarray, source: str, by_rank: np.ndarray) -> str:
    """Left: histogram of `scores` (described by `source`). Right: each query's top-k scores over rank, divided by
    its rank-1 score (how fast the influence falls off), with the median over queries in bold.

    by_rank [Q, k] (NaN where a query has fewer than k documents).
    """
    figure = Figure(figsize=(11, 3.4))
    hist, decay = figure.subplots(1, 2)
    finite = scores[np.isfinite(scores)]
    bins = np.histogram_bin_edges(finite, bins=60)
    hist.hist(finite[finite >= 0], bins=bins, color=POSITIVE_COLOUR, alpha=0.8, label="positive (helpful)")
    hist.hist(finite[finite < 0], bins=bins, color=NEGATIVE_COLOUR, alpha=0.8, label="negative (harmful)")
    hist.set_yscale("log")
    hist.set_xlabel("score τ(z_q, z_m)")
    hist.set_ylabel("documents")
    hist.set_title(f"score distribution: {source}", fontsize=10)
    hist.legend(fontsize=8)
    if by_rank.size:
        ranks = np.arange(1, by_rank.shape[1] + 1)
        top = by_rank[:, :1]
        relative = np.divide(by_rank, np.abs(top), out=np.full_like(by_rank, np.nan), where=np.abs(top) > 0)
        for row in relative[:MAX_LINES]:
            decay.plot(ranks, row, color="0.6", linewidth=0.6, alpha=0.5)
        decay.plot(ranks, np.nanmedian(relative, axis=0), color=POSITIVE_COLOUR, linewidth=2.2, label="median")
        decay.legend(fontsize=8)
    decay.set_xlabel("rank")
    decay.xaxis.set_major_locator(MaxNLocator(integer=True))
    decay.set_ylabel("score / |rank-1 score|")
    decay.set_title(f"top-k score by rank ({min(len(by_rank), MAX_LINES)} of {len(by_rank)} queries)", fontsize=10)
    return figure_png(figure)


def _log_ranks(n: int) -> np.ndarray:
    """Indices 0..n-1 subsampled on a log scale (all of them when n is small)."""
    if n <= MAX_SPECTRUM_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, MAX_SPECTRUM_POINTS).astype(int) - 1)


def eigen_spectra(spectra: Mapping[str, Mapping[str, np.ndarray]], dampings: Mapping[str, float]) -> str:
    """Sorted eigenvalues per module: Λ (corrected, the diagonal of G in the Kronecker eigenbasis), those of
    A = E[ā āᵀ] and of S = E[Ds Dsᵀ]; log-log over the normalised rank. The damping λ of each solver is dashed.

    spectra[module] = {"lambda": Λ flattened, "a": eigenvalues of A, "s": eigenvalues of S}.
    """
    figure = Figure(figsize=(13, 3.6))
    axes = figure.subplots(1, 3)
    titles = {"lambda": "EK-FAC eigenvalues Λ", "a": "eigenvalues of A (inputs)", "s": "eigenvalues of S (output grads)"}
    cmap = colormaps["viridis"]
    names = list(spectra)
    for axis, field in zip(axes, ("lambda", "a", "s")):
        largest = max((float(np.max(spectra[name][field], initial=0.0)) for name in names), default=0.0)
        for i, name in enumerate(names):
            values = np.sort(np.asarray(spectra[name][field], dtype=np.float64))[::-1]
            values = values[values > largest * SPECTRUM_FLOOR]
            if values.size == 0:
                continue
            keep = _log_ranks(values.size)
            axis.plot(
                (keep + 1) / values.size,
                values[keep],
                color=cmap(i / max(1, len(names) - 1)),
                linewidth=1.2,
                label=name if len(names) <= MAX_LEGEND_ENTRIES else None,
            )
        if field == "lambda":
            for solver, damping in dampings.items():
                axis.axhline(damping, color=NEGATIVE_COLOUR, linestyle="--", linewidth=1, label=f"λ ({solver})")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rank / size")
        axis.set_title(titles[field], fontsize=10)
    axes[0].legend(fontsize=6, loc="lower left")
    return figure_png(figure)


def stack_by_rank(query_ids: Sequence[int], ranks: Sequence[int], scores: Sequence[float]) -> np.ndarray:
    """[Q, k] scores indexed by (query, rank), NaN where a query has fewer rows."""
    order = {q: i for i, q in enumerate(dict.fromkeys(query_ids))}
    k = max(ranks, default=0)
    table = np.full((len(order), k), np.nan)
    for q, r, s in zip(query_ids, ranks, scores):
        table[order[q], r - 1] = s
    return table


def _bands(iterations: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(iterations present, p10, median, p90 of `values` over the rows at each)."""
    steps = np.unique(iterations)
    out = np.full((3, len(steps)), np.nan)
    for i, k in enumerate(steps):
        at = values[(iterations == k) & np.isfinite(values)]
        if at.size:
            out[:, i] = np.quantile(at, [0.1, 0.5, 0.9])
    return steps, out[0], out[1], out[2]


def convergence_bands(methods: Mapping[str, Mapping[str, object]]) -> str:
    """One column per iterative method: the relative change of the objective (h_k − h_0)/|h_0| (top) and the
    residual ratio r_k/r_0 (bottom, log) on the FIXED held-out batch, median over queries (bold, dots at the
    evaluated iterations) inside its p10-p90 band; the median on each iteration's own minibatch (grey, dashed)
    for comparison: it zig-zags because every iteration measures h on another G̃.

    methods[name] = {"trace": minibatch rows, "heldout": held-out rows or None, each with "iteration" and the
    relative "change" and "ratio" arrays (tracking.relative_to_start), "queries": the number of queries}.
    """
    figure = Figure(figsize=(max(6.0, 5.2 * len(methods)), 6.2))
    axes = figure.subplots(2, len(methods), squeeze=False, sharex="col")
    for column, (name, data) in enumerate(methods.items()):
        top, bottom = axes[0, column], axes[1, column]
        trace, heldout = data["trace"], data.get("heldout")
        for axis, field in ((top, "change"), (bottom, "ratio")):
            steps, _, median, _ = _bands(trace["iteration"], trace[field])
            axis.plot(steps, median, color="0.55", linestyle="--", linewidth=1.1,
                      label="median on each iteration's minibatch")
            if heldout is not None and len(heldout["iteration"]):
                steps, low, median, high = _bands(heldout["iteration"], heldout[field])
                axis.fill_between(steps, low, high, color=POSITIVE_COLOUR, alpha=0.18, linewidth=0,
                                  label="held-out p10-p90 over queries")
                axis.plot(steps, median, color=POSITIVE_COLOUR, linewidth=2.4, marker="o", markersize=4,
                          label="held-out median")
            else:
                steps, low, _, high = _bands(trace["iteration"], trace[field])
                axis.fill_between(steps, low, high, color="0.6", alpha=0.15, linewidth=0,
                                  label="minibatch p10-p90 (no held-out batch)")
        top.axhline(0.0, color="0.3", linewidth=0.7)
        bottom.axhline(1.0, color="0.3", linewidth=0.7)
        bottom.set_yscale("log")
        where = "held-out batch" if heldout is not None else "minibatches (no held-out evaluation)"
        top.set_title(f"{name}: {data['queries']} queries, {where}", fontsize=10)
        top.set_ylabel("(h_k − h_0) / |h_0|   (lower is better)")
        bottom.set_ylabel("‖r_k‖ / ‖r_0‖")
        bottom.set_xlabel("iteration k")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.legend(fontsize=7, loc="best")
    return figure_png(figure)
