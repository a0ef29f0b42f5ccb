"""One logger for every stage: always a local `metrics.jsonl`, plus W&B (offline unless configured online).

Online mode without an API key (or with `WANDB_MODE=offline` in the environment), or whose W&B server does not
answer a TCP connection within `REACHABLE_TIMEOUT_S`, falls back to offline at once with a warning, so a run never
waits on the network (an unreachable host would otherwise hold `wandb.init` for up to 90 s).

Besides scalars (`log`), a stage can log an eigen-spectrum histogram (`histogram`), a table such as the top-k
(`table`, a `wandb.Table`), one chart of many lines (`line_series`, e.g. every query's convergence) and files such as
`summary.json` and `report.html` (`artifact`). The run is named `tracking.run_name` or `<run dir>-<job>`, grouped by
run directory, and carries the whole config.

Layout (docs/design.md, "Tracking"): every key is scoped by its stage, and each stage has its own x-axis declared
with W&B's `define_metric` (`define_axis`), so its series are continuous and never restart:

    train/*          against train/step         the tiny GPT-2's loss, lr, grad norm, tokens/s
    fit/*            against fit/batch          covariance and Λ passes: rows, fraction, sequences/s
    solve/<method>/* against solve/<method>/iteration (one counter over all query chunks)
    score/<method>/* against score/<method>/shard (shards scored)

`stage(scope)` (or the `metered` decorator) measures a stage: `<scope>/seconds`, `<scope>/peak_rss_mb` (this
process, sampled), `<scope>/cuda_max_allocated_mb` and, from what the stage `count`s, `<scope>/<unit>_per_s`.
`summary` writes the run's figures to the W&B summary only (no history series).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from distributed_astra.config import TrackingConfig

log = logging.getLogger(__name__)


REACHABLE_TIMEOUT_S = 3.0


def _server_reachable(timeout: float = REACHABLE_TIMEOUT_S) -> bool:
    """Whether the W&B server (`WANDB_BASE_URL`, default api.wandb.ai) accepts a TCP connection within `timeout`."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _wandb_mode(requested: str) -> str:
    if requested == "online" and (os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")):
        log.warning("tracking.wandb_mode is online but no WANDB_API_KEY is set (or WANDB_MODE=offline): logging offline")
        return "offline"
    if requested == "online" and not _server_reachable():
        log.warning("tracking.wandb_mode is online but the W&B server is unreachable: logging offline "
                    "(upload later with `wandb sync <run dir>/wandb/offline-run-*`)")
        return "offline"
    return requested


class Tracker:
    """Logs scalar metrics to `<run_dir>/metrics.jsonl` and to W&B under the same keys."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, config: dict[str, Any], job: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.job = job
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self._wandb = None
        self._axes: dict[str, str] = {}
        self._meters: list[StageMeter] = []
        mode = _wandb_mode(cfg.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.project,
                name=cfg.run_name or f"{self.run_dir.name}-{job}",
                group=self.run_dir.name,
                job_type=job,
                dir=str(self.run_dir),
                config=config,
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True, init_timeout=30),
            )
            self._write({"wandb_run": self.wandb_location}, None)

    def _write(self, metrics: dict[str, Any], step: int | None) -> None:
        record = {"job": self.job, "time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def log(self, metrics: dict[str, Any]) -> None:
        """Scalars under their stage-scoped keys; a stage's axis (`define_axis`) travels as one of them."""
        self._write(metrics, None)
        if self._wandb is not None:
            self._wandb.log(metrics)

    def define_axis(self, prefix: str, step: str) -> None:
        """Every key under `prefix/` is plotted against the metric `step` (W&B `define_metric`; the step is a
        key of its own that the stage logs, e.g. `train/step`). Defined once per prefix; metrics.jsonl records it."""
        if self._axes.get(prefix) == step:
            return
        self._axes[prefix] = step
        self._write({"axis": {"metrics": f"{prefix}/*", "step": step}}, None)
        if self._wandb is not None:
            self._wandb.define_metric(step)
            self._wandb.define_metric(f"{prefix}/*", step_metric=step)

    def stage(self, scope: str) -> StageMeter:
        """A context manager measuring the stage `scope` (seconds, peak memory, throughput of what it `count`s)."""
        return StageMeter(self, scope)

    def count(self, **amounts: float) -> None:
        """Add work done (e.g. tokens=..., sequences=...) to the innermost running stage: its `<unit>_per_s`."""
        if self._meters:
            self._meters[-1].add(**amounts)

    @property
    def wandb_location(self) -> str | None:
        """Where the W&B run is: its URL online, its folder offline (None when W&B is disabled)."""
        if self._wandb is None:
            return None
        if self._wandb.offline:  # .url warns offline
            return str(Path(self._wandb.dir).parent)
        return self._wandb.url or str(Path(self._wandb.dir).parent)

    def histogram(self, key: str, values: Any) -> None:
        """A W&B histogram of `values` (an array or tensor, e.g. log10 of a module's eigenvalues); metrics.jsonl gets
        their count, min, max and mean. Non-finite values are dropped."""
        array = np.asarray(values, dtype=np.float64).ravel()
        finite = array[np.isfinite(array)]
        stats = {"count": int(finite.size)}
        if finite.size:
            stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
        self._write({f"{key}/{name}": value for name, value in stats.items()}, None)
        if self._wandb is not None and finite.size:
            import wandb

            self._wandb.log({key: wandb.Histogram(finite)})

    def progress(self, prefix: str, total: int) -> Callable[[str, int], None]:
        """An `on_batch(part, rows)` callback logging, against the axis `<prefix>/batch` (batches done over all
        parts), `<prefix>/<part>/rows` done, `<prefix>/<part>/fraction` of `total` and the rate
        `<prefix>/sequences_per_s` (factor fitting: part is "covariance" or "lambda")."""
        done: dict[str, int] = {}
        batches = [0]
        start = time.perf_counter()
        self.define_axis(prefix, f"{prefix}/batch")

        def on_batch(part: str, rows: int) -> None:
            done[part] = done.get(part, 0) + rows
            batches[0] += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            self.log({f"{prefix}/batch": batches[0], f"{prefix}/{part}/rows": done[part],
                      f"{prefix}/{part}/fraction": done[part] / max(1, total),
                      f"{prefix}/sequences_per_s": sum(done.values()) / elapsed})

        return on_batch

    def table(self, key: str, columns: dict[str, Sequence[Any]]) -> None:
        """A `wandb.Table` from equal-length columns (e.g. the top-k); metrics.jsonl gets its row count."""
        rows = list(zip(*columns.values()))
        self._write({f"{key}/rows": len(rows)}, None)
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def line_series(
        self, key: str, xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]], keys: Sequence[str],
        title: str, xname: str,
    ) -> None:
        """ONE W&B chart of many lines (`wandb.plot.line_series`, backed by a table): line i is (xs[i], ys[i]) named
        keys[i]. metrics.jsonl gets the line count."""
        self._write({f"{key}/lines": len(ys)}, None)
        if self._wandb is not None and ys:
            import wandb

            chart = wandb.plot.line_series(
                xs=[list(map(float, x)) for x in xs], ys=[list(map(float, y)) for y in ys], keys=[str(k) for k in keys],
                title=title, xname=xname,
            )
            self._wandb.log({key: chart})

    def artifact(self, name: str, kind: str, paths: Sequence[Path]) -> None:
        """The files `paths` that exist (e.g. summary.json, report.html) as one W&B artifact `name` of type `kind`."""
        files = [Path(p) for p in paths if Path(p).is_file()]
        self._write({f"artifact/{name}": [str(p) for p in files]}, None)
        if self._wandb is not None and files:
            import wandb

            artifact = wandb.Artifact(name, type=kind)
            for path in files:
                artifact.add_file(str(path), name=path.name)
            self._wandb.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        """The run's figures (e.g. fact-tracing recall per method) into the W&B summary, not as history series;
        metrics.jsonl gets them as `summary/<key>`."""
        self._write({f"summary/{k}": v for k, v in values.items() if isinstance(v, (int, float, str, bool))}, None)
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing (it comes with ray and deepspeed) or the process table unreadable
        return None


class StageMeter:
    """One stage's seconds, peak memory and throughput, logged under `scope` when the stage ends.

    Peak RSS is this process's resident memory sampled every `SAMPLE_S` by a daemon thread (the max over the stage;
    without psutil, the process-lifetime `ru_maxrss`); CUDA: `torch.cuda.max_memory_allocated` since the stage
    began. Work the stage reports with `Tracker.count(unit=amount)` gives `<scope>/<unit>_per_s`. A stage that
    raises logs nothing. Distributed stages run on other processes: they log their ranks' memory themselves.
    """

    SAMPLE_S = 0.1

    def __init__(self, tracker: Tracker, scope: str) -> None:
        self.tracker = tracker
        self.scope = scope
        self.counts: dict[str, float] = {}
        self.seconds = 0.0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, **amounts: float) -> None:
        for unit, amount in amounts.items():
            self.counts[unit] = self.counts.get(unit, 0.0) + float(amount)

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self.peak_rss = max(self.peak_rss, _rss_bytes() or 0)

    def __enter__(self) -> StageMeter:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = _rss_bytes() or 0
        self._thread = threading.Thread(target=self._sample, name=f"meter-{self.scope}", daemon=True)
        self._thread.start()
        self.tracker._meters.append(self)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        import torch

        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.tracker._meters.remove(self)
        if exc_type is not None:
            return
        rss = max(self.peak_rss, _rss_bytes() or 0)
        if rss == 0:  # no psutil: the lifetime peak (KiB on Linux)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        metrics: dict[str, float] = {f"{self.scope}/seconds": self.seconds, f"{self.scope}/peak_rss_mb": rss / 2**20}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics[f"{self.scope}/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for unit, amount in self.counts.items():
            metrics[f"{self.scope}/{unit}_per_s"] = amount / max(self.seconds, 1e-9)
        self.tracker.log(metrics)


F = TypeVar("F", bound=Callable[..., Any])


def metered(scope: str | Callable[[Any], str]) -> Callable[[F], F]:
    """Decorate a stage `fn(ctx, ...)` to run inside `ctx.tracker.stage(scope)` (`scope(ctx)` when callable)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(ctx, *args, **kwargs):
            with ctx.tracker.stage(scope(ctx) if callable(scope) else scope):
                return fn(ctx, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


MAX_CHART_LINES = 100  # per-query lines in the one W&B convergence chart; the trace table holds every query


def _quantiles(values: np.ndarray, prefix: str) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {}
    p10, median, p90 = np.quantile(finite, [0.1, 0.5, 0.9])
    return {f"{prefix}_p10": float(p10), f"{prefix}_median": float(median), f"{prefix}_p90": float(p90)}


def relative_to_start(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(h_k − h_0)/|h_0| and r_k/r_0 of trace rows, h_0 and r_0 being each (query, repeat)'s first row."""
    change = np.full(len(rows["objective"]), np.nan)
    ratio = np.full_like(change, np.nan)
    first: dict[tuple[str, int], tuple[float, float]] = {}
    for i in np.lexsort((rows["iteration"], rows["repeat"], rows["query_id"].astype(str))):
        key = (str(rows["query_id"][i]), int(rows["repeat"][i]))
        h0, r0 = first.setdefault(key, (float(rows["objective"][i]), float(rows["residual"][i])))
        change[i] = (rows["objective"][i] - h0) / (abs(h0) or 1.0)
        ratio[i] = rows["residual"][i] / (r0 or 1.0)
    return change, ratio


def _by_iteration(iterations: np.ndarray, values: np.ndarray) -> tuple[list[float], list[list[float]]]:
    """Iterations present and the p10 / median / p90 of `values` at each (three lists)."""
    steps = sorted({int(k) for k in iterations})
    bands: list[list[float]] = [[], [], []]
    for k in steps:
        at = values[(iterations == k) & np.isfinite(values)]
        for band, q in zip(bands, np.quantile(at, [0.1, 0.5, 0.9]) if at.size else [np.nan] * 3):
            band.append(float(q))
    return [float(k) for k in steps], bands


class SolveLogger:
    """The W&B layout of one method's iterative solve, whatever the number of queries (docs/design.md, "Tracking").

    While it runs, per iteration of each query chunk, aggregates over the chunk's running queries against ONE axis
    `solve/<method>/iteration` that goes on counting across chunks (chunk c starts where c − 1 ended):
    objective_mean, residual_mean, lr, running, chunk, and the p10 / median / p90 over queries of the relative
    change of h from its start, (h_k − h_0)/|h_0| (`objective_change_*`), and of r_k/r_0 (`residual_ratio_*`);
    the held-out evaluation's (ihvp/solvers.py) under `solve/<method>/heldout/`. No key per query.
    At the end (`finish`), once: the per-query trace as a table (`trace`, `heldout_trace`), one chart of every
    query's relative h (`per_query`, at most MAX_CHART_LINES lines) and one of the quantile bands over all queries
    per iteration, minibatch and held-out (`convergence`).
    """

    def __init__(self, tracker: Tracker, method: str) -> None:
        self.tracker = tracker
        self.method = method
        self.prefix = f"solve/{method}"
        self.axis = f"{self.prefix}/iteration"
        self.chunks = 0
        self._next = 0  # the global iteration the next chunk starts at
        tracker.define_axis(self.prefix, self.axis)

    def chunk(self, query_ids: Sequence[Any]) -> tuple[Callable[..., None], Callable[..., None]]:
        """(on_iteration, on_heldout) callbacks of the solver for the next chunk of `query_ids`."""
        offset, chunk = self._next, self.chunks
        self.chunks += 1
        first_h = np.full(len(query_ids), np.nan)
        first_r = np.full(len(query_ids), np.nan)
        held_h = np.full(len(query_ids), np.nan)
        held_r = np.full(len(query_ids), np.nan)

        def relative(h, r, h0, r0) -> tuple[np.ndarray, np.ndarray]:
            start = np.isnan(h0) & np.isfinite(h)
            h0[start], r0[start] = h[start], r[start]
            scale = np.where(np.abs(h0) > 0, np.abs(h0), 1.0)
            return (h - h0) / scale, r / np.where(r0 > 0, r0, 1.0)

        def on_iteration(iteration: int, objective, residual, lr: float) -> None:
            h, r = np.asarray(objective, dtype=np.float64), np.asarray(residual, dtype=np.float64)
            running = np.isfinite(h)
            step = offset + int(iteration)
            self._next = max(self._next, step + 1)
            if not running.any():
                return
            change, ratio = relative(h, r, first_h, first_r)
            self.tracker.log({
                self.axis: step, f"{self.prefix}/chunk": chunk, f"{self.prefix}/lr": float(lr),
                f"{self.prefix}/running": int(running.sum()),
                f"{self.prefix}/objective_mean": float(h[running].mean()),
                f"{self.prefix}/residual_mean": float(r[running].mean()),
                **_quantiles(change[running], f"{self.prefix}/objective_change"),
                **_quantiles(ratio[running], f"{self.prefix}/residual_ratio"),
            })

        def on_heldout(iteration: int, objective, residual) -> None:
            h, r = np.asarray(objective, dtype=np.float64), np.asarray(residual, dtype=np.float64)
            measured = np.isfinite(h)
            step = offset + int(iteration)
            self._next = max(self._next, step)
            if not measured.any():
                return
            change, ratio = relative(h, r, held_h, held_r)
            self.tracker.log({
                self.axis: step, f"{self.prefix}/heldout/objective_mean": float(h[measured].mean()),
                f"{self.prefix}/heldout/residual_mean": float(r[measured].mean()),
                **_quantiles(change[measured], f"{self.prefix}/heldout/objective_change"),
                **_quantiles(ratio[measured], f"{self.prefix}/heldout/residual_ratio"),
            })

        return on_iteration, on_heldout

    def finish(self, trace: Any | None, heldout: Any | None = None) -> None:
        """Log the whole solve once: `trace` / `heldout` are the pyarrow tables of trace.parquet / heldout.parquet."""
        lines_x: list[list[float]] = []
        lines_y: list[list[float]] = []
        names: list[str] = []
        for key, table in (("trace", trace), ("heldout_trace", heldout)):
            if table is None or table.num_rows == 0:
                continue
            rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
            change, ratio = relative_to_start(rows)
            columns = {name: rows[name].tolist() for name in ("query_id", "repeat", "iteration", "objective", "residual")}
            columns.update(objective_change=change.tolist(), residual_ratio=ratio.tolist())
            if "status" in rows:
                columns["status"] = rows["status"].tolist()
            self.tracker.table(f"{self.prefix}/{key}", columns)
            label = "minibatch" if key == "trace" else "held-out"
            steps, bands = _by_iteration(rows["iteration"], change)
            for band, name in zip(bands, ("p10", "median", "p90")):
                lines_x.append(steps)
                lines_y.append(band)
                names.append(f"{label} {name}")
            if key == "trace":
                shown = list(dict.fromkeys(rows["query_id"].tolist()))[:MAX_CHART_LINES]
                xs, ys = [], []
                for q in shown:
                    at = np.flatnonzero((rows["query_id"] == q) & (rows["repeat"] == 0))
                    at = at[np.argsort(rows["iteration"][at])]
                    xs.append(rows["iteration"][at].tolist())
                    ys.append(change[at].tolist())
                self.tracker.line_series(
                    f"{self.prefix}/per_query", xs, ys, [str(q) for q in shown],
                    f"{self.method}: (h_k − h_0)/|h_0| per query on each iteration's minibatch "
                    f"({len(shown)} queries)", "iteration",
                )
        if lines_y:
            self.tracker.line_series(
                f"{self.prefix}/convergence", lines_x, lines_y, names,
                f"{self.method}: (h_k − h_0)/|h_0| over queries (p10, median, p90), minibatch and held-out",
                "iteration",
            )


TRAIN_RATE_EVERY = 10  # steps per tokens/s window of the training log


def train_logger(tracker: Tracker) -> Callable[[dict[str, float]], None]:
    """The `on_metrics` callback of `models.tiny.train_tiny_gpt2`: every step train/loss, train/lr, train/grad_norm
    against the axis train/step; every TRAIN_RATE_EVERY steps the window's train/tokens_per_s and
    train/sequences_per_s (the demo's tiny GPT-2 training is most of its wall time)."""
    tracker.define_axis("train", "train/step")
    window = {"tokens": 0, "sequences": 0, "start": time.perf_counter()}

    def on_metrics(metrics: dict[str, float]) -> None:
        window["tokens"] += metrics["tokens"]
        window["sequences"] += metrics["sequences"]
        row = {"train/step": metrics["step"], "train/loss": metrics["loss"], "train/lr": metrics["lr"],
               "train/grad_norm": metrics["grad_norm"]}
        if (metrics["step"] + 1) % TRAIN_RATE_EVERY == 0:
            elapsed = max(time.perf_counter() - window["start"], 1e-9)
            row.update({"train/tokens_per_s": window["tokens"] / elapsed,
                        "train/sequences_per_s": window["sequences"] / elapsed})
            window.update(tokens=0, sequences=0, start=time.perf_counter())
        tracker.log(row)

    return on_metrics
