"""Per-query convergence monitoring of the iterative iHVP solvers, and the trace they leave (seeds §4 Eq 4, §5).

Every iteration k of SNI / LiSSA / ASTRA computes u = G̃_k x_k on its minibatch. From that SAME product (no extra
curvature product) the monitor gets, per query,

    h(x_k)      = ½ x_kᵀ (G̃_k + λI) x_k − vᵀ x_k     the objective the solvers minimise (its minimum is −½ vᵀ(G+λI)⁻¹v)
    residual_k  = ‖(G̃_k + λI) x_k − v‖

so a row (query, iteration k) describes the iterate x_k BEFORE step k's update, measured on minibatch k.

A query stops:
  * "converged": |h_k − h_{k−1}| ≤ tolerance · |h_k| for `patience` consecutive iterations (tolerance 0: never);
  * "diverged": h_k is NaN/Inf, or h rose for `patience` consecutive iterations while above its first value h_0
    (momentum makes h oscillate, but a convergent heavy-ball run stays below h_0; a diverging one does not). The
    monitor logs a warning naming the query and suggesting a lower lr or more damping; the solver then returns the
    EK-FAC solution for that query and flags it;
  * "max_iterations": the iteration cap was reached.
Other queries go on. h is measured on a different minibatch each iteration, so with a small minibatch (or the
sampled-label Fisher product) it is noisy: keep `patience` around 10 (the default); with patience 1-3 minibatch
noise alone can trigger both rules. Rows of running queries have status "running"; each query's last row carries its final status.

`on_iteration(iteration, h[Q], residual[Q], lr)` (e.g. a W&B logger) receives tensors over ALL Q queries, NaN for
queries that are no longer running. Write the trace with `trace_table(...)` (a pyarrow.Table for `trace.parquet`).

Because every row is measured on a different minibatch, the trace's h zig-zags and cannot say whether the solve
converged. `HeldoutTrace` holds the other signal (ihvp/solvers.py, `HeldoutEvaluator`): h and the residual of the
iterates on ONE fixed curvature batch drawn once, every `solver.heldout_every` iterations and at the end, so the
held-out h of a query is a deterministic function of its iterate and its differences over iterations are real
(`heldout_table(...)` gives `heldout.parquet`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

log = logging.getLogger(__name__)

OnIteration = Callable[[int, torch.Tensor, torch.Tensor, float], None]
OnHeldout = Callable[[int, torch.Tensor, torch.Tensor], None]  # (global iteration, h[Q], residual[Q]), NaN = not evaluated

RUNNING = "running"
CONVERGED = "converged"
DIVERGED = "diverged"
MAX_ITERATIONS = "max_iterations"
EXACT = "exact"  # the EK-FAC solver: no iteration
# The Arrow type of every column of trace.parquet; heldout.parquet has the first six.
COLUMN_TYPES = {
    "query": "int64", "query_id": "string", "repeat": "int64", "iteration": "int64",
    "objective": "float64", "residual": "float64", "lr": "float64", "status": "string",
}
TRACE_COLUMNS = tuple(COLUMN_TYPES)
HELDOUT_COLUMNS = TRACE_COLUMNS[:6]


@dataclass
class HeldoutTrace:
    """Column-wise rows of the held-out evaluation: one per (query, repeat, iteration k) evaluated, k being the
    number of steps taken (k = 0: the initial iterate; the last row of a query: its final iterate)."""

    COLUMNS: ClassVar[tuple[str, ...]] = HELDOUT_COLUMNS

    query: list[int] = field(default_factory=list)
    query_id: list[str] = field(default_factory=list)
    repeat: list[int] = field(default_factory=list)
    iteration: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.query)

    def columns(self) -> dict[str, list]:
        return {name: getattr(self, name) for name in self.COLUMNS}


@dataclass
class Trace(HeldoutTrace):
    """Column-wise trace rows: one per (query, repeat, iteration) that was actually iterated, with its step size
    and status besides the held-out columns."""

    COLUMNS: ClassVar[tuple[str, ...]] = TRACE_COLUMNS

    lr: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        cols = self.columns()
        return [{k: cols[k][i] for k in TRACE_COLUMNS} for i in range(len(self))]

    def for_query(self, q: int) -> dict[str, list]:
        """The columns restricted to query q (in iteration order)."""
        keep = [i for i, x in enumerate(self.query) if x == q]
        return {k: [v[i] for i in keep] for k, v in self.columns().items()}


def heldout_table(trace: HeldoutTrace | dict[str, list]):
    """A pyarrow.Table (query int64, query_id string, repeat, iteration int64, objective, residual float64) for
    `heldout.parquet`, from a `HeldoutTrace` or a dict of its columns."""
    cols = trace.columns() if isinstance(trace, HeldoutTrace) else {k: list(trace.get(k, [])) for k in HELDOUT_COLUMNS}
    return _typed_table(cols, HELDOUT_COLUMNS)


def _typed_table(cols: Mapping[str, list], names: Sequence[str]):
    """The named columns as a pyarrow.Table with their `COLUMN_TYPES`."""
    import pyarrow as pa

    schema = pa.schema([(name, getattr(pa, COLUMN_TYPES[name])()) for name in names])
    return pa.table({name: cols[name] for name in names}, schema=schema)


def heldout_summary(table, info: Mapping[str, object] | None = None) -> dict[str, object]:
    """summary.json's figures of a solve's held-out evaluation (`heldout.parquet` as a pyarrow.Table; `info`: its
    meta.json record, copied with a heldout_ prefix): the mean h and residual of the
    queries' first (the start) and last (the returned direction) evaluation on the fixed batch, whether the mean h
    decreased, the fraction of queries whose h decreased, the median relative change (h_last − h_0)/|h_0| and that
    of the last interval alone (h_last − h_prev)/|h_0|: still clearly negative means more iterations would help."""
    rows = table.to_pydict()
    per_query: dict[str, list[tuple[int, int, float, float]]] = {}
    for q, rep, k, h, r in zip(rows["query_id"], rows["repeat"], rows["iteration"], rows["objective"], rows["residual"]):
        per_query.setdefault(q, []).append((rep, k, h, r))
    if not per_query:
        return {}
    firsts, lasts, changes, tail = [], [], [], []
    for points in per_query.values():
        points.sort()
        (_, _, h0, r0), (_, _, h1, r1) = points[0], points[-1]
        scale = abs(h0) or 1.0
        firsts.append((h0, r0))
        lasts.append((h1, r1))
        changes.append((h1 - h0) / scale)
        if len(points) > 1:
            tail.append((h1 - points[-2][2]) / scale)
    n = len(firsts)
    first_mean, last_mean = sum(h for h, _ in firsts) / n, sum(h for h, _ in lasts) / n
    return {
        "heldout_objective_first_mean": first_mean,
        "heldout_objective_last_mean": last_mean,
        "heldout_residual_first_mean": sum(r for _, r in firsts) / n,
        "heldout_residual_last_mean": sum(r for _, r in lasts) / n,
        "heldout_decreased": bool(last_mean < first_mean),
        "heldout_decreased_fraction": sum(c < 0 for c in changes) / n,
        "heldout_change_median": float(statistics.median(changes)),
        "heldout_last_interval_change_median": float(statistics.median(tail)) if tail else 0.0,
        **{f"heldout_{k}": v for k, v in (info or {}).items()},
    }


def trace_table(trace: Trace | Sequence[dict] | dict[str, list]):
    """A pyarrow.Table with columns query (int64), query_id (string), repeat, iteration (int64), objective, residual,
    lr (float64), status (string), from a `Trace`, a list of row dicts, or a dict of columns."""
    if hasattr(trace, "trace") and isinstance(trace.trace, Trace):  # a SolveResult
        trace = trace.trace
    if isinstance(trace, Trace):
        cols = trace.columns()
    elif isinstance(trace, dict):
        cols = {k: list(trace.get(k, [])) for k in TRACE_COLUMNS}
    else:
        cols = {k: [row[k] for row in trace] for k in TRACE_COLUMNS}
    return _typed_table(cols, TRACE_COLUMNS)


class ConvergenceMonitor:
    """Stopping rules and trace rows for Q queries (see the module docstring).

    `update(iteration, index, h, residual, lr)` takes the values of the running queries `index` (LongTensor) and
    returns a bool tensor over `index`: which of them stop now (their status is then in `status`).
    `start_repeat(r, index)` resets the per-query history at the start of a LiSSA repeat.
    """

    def __init__(
        self,
        num_queries: int,
        tolerance: float,
        patience: int,
        max_iterations: int,
        *,
        solver: str = "astra",
        lr_setting: str = "",
        query_ids: Sequence[str] | None = None,
        on_iteration: OnIteration | None = None,
        rise_rtol: float = 1e-12,
    ) -> None:
        if query_ids is not None and len(query_ids) != num_queries:
            raise ValueError(f"{len(query_ids)} query ids for {num_queries} queries")
        self.num_queries = num_queries
        self.tolerance = float(tolerance)
        self.patience = int(patience)
        self.max_iterations = int(max_iterations)
        self.solver = solver
        self.lr_setting = lr_setting
        self.query_ids = [str(q) for q in query_ids] if query_ids is not None else [str(q) for q in range(num_queries)]
        self.on_iteration = on_iteration
        self.rise_rtol = rise_rtol
        self.trace = Trace()
        self.status = [RUNNING] * num_queries
        self.iterations = [0] * num_queries  # iterations run (summed over repeats)
        self.messages: list[str] = []
        self.repeat = 0
        self._reset_history()

    def _reset_history(self) -> None:
        n = self.num_queries
        self._prev = [math.nan] * n
        self._first = [math.nan] * n
        self._small = [0] * n
        self._rises = [0] * n

    def start_repeat(self, repeat: int) -> None:
        self.repeat = repeat
        self._reset_history()

    def describe(self, q: int) -> str:
        qid = self.query_ids[q]
        return f"query {q}" if qid == str(q) else f"query {q} (id '{qid}')"

    def update(
        self, iteration: int, index: torch.Tensor, h: torch.Tensor, residual: torch.Tensor, lr: float, *,
        step: int | None = None, last: bool = False,
    ) -> torch.Tensor:
        """Record one iteration of the running queries `index`; return which of them stop now ([len(index)] bool).

        `last`: this is the final iteration (of this repeat): still-running queries get "max_iterations".
        `step` is the global iteration number passed to `on_iteration` (defaults to `iteration`).
        """
        h_list = h.detach().double().cpu().tolist()
        r_list = residual.detach().double().cpu().tolist()
        idx_list = index.cpu().tolist()
        stop = [False] * len(idx_list)
        for j, q in enumerate(idx_list):
            hk, status = h_list[j], RUNNING
            self.iterations[q] += 1
            if not math.isfinite(hk) or not math.isfinite(r_list[j]):
                status = DIVERGED
                reason = "the objective h became NaN/Inf"
            else:
                prev = self._prev[q]
                if math.isnan(self._first[q]):
                    self._first[q] = hk
                if math.isfinite(prev):
                    if hk > prev + self.rise_rtol * abs(prev) and hk > self._first[q]:
                        self._rises[q] += 1
                    else:
                        self._rises[q] = 0
                    small = abs(hk - prev) <= self.tolerance * abs(hk) if self.tolerance > 0 else False
                    self._small[q] = self._small[q] + 1 if small else 0
                self._prev[q] = hk
                if self._rises[q] >= self.patience:
                    status = DIVERGED
                    reason = f"h rose for {self.patience} consecutive iterations (now {hk:.6g})"
                elif self.tolerance > 0 and self._small[q] >= self.patience:
                    status = CONVERGED
                elif last:
                    status = MAX_ITERATIONS
            if status == DIVERGED:
                msg = (
                    f"{self.solver}: {self.describe(q)} diverged at iteration {iteration}"
                    + (f" of repeat {self.repeat}" if self.repeat else "")
                    + f": {reason}; lower solver.lr{self.lr_setting} or raise solver.damping. "
                    "Its result falls back to the EK-FAC solution (flagged in the trace)."
                )
                self.messages.append(msg)
                log.warning(msg)
            if status != RUNNING:
                stop[j] = True
            self.status[q] = status
            self.trace.query.append(q)
            self.trace.query_id.append(self.query_ids[q])
            self.trace.repeat.append(self.repeat)
            self.trace.iteration.append(iteration)
            self.trace.objective.append(hk)
            self.trace.residual.append(r_list[j])
            self.trace.lr.append(float(lr))
            self.trace.status.append(status)
        if self.on_iteration is not None:
            full_h = torch.full((self.num_queries,), math.nan, dtype=torch.float64)
            full_r = torch.full((self.num_queries,), math.nan, dtype=torch.float64)
            full_h[index.cpu()] = h.detach().double().cpu()
            full_r[index.cpu()] = residual.detach().double().cpu()
            self.on_iteration(iteration if step is None else step, full_h, full_r, float(lr))
        return torch.tensor(stop, dtype=torch.bool)
