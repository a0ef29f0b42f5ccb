"""One logger for every stage: always a local `metrics.jsonl`, plus W&B (offline unless configured online).

Online mode without an API key (or with `WANDB_MODE=offline` in the environment), or whose W&B server does not
answer a TCP connection within `REACHABLE_TIMEOUT_S`, falls back to offline at once with a warning, so a run never
waits on the network (an unreachable host would otherwise hold `wandb.init` for up to 90 s).

Besides scalars (`log`), a stage can log an eigen-spectrum histogram (`histogram`), a table such as the top-k
(`table`, a `wandb.Table`), and files such as `summary.json` and `report.html` (`artifact`). The run is named
`tracking.run_name` or `<run dir>-<job>`, grouped by run directory, and carries the whole config.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
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

    def log(self, metrics: dict[str, float | int | str], step: int | None = None) -> None:
        self._write(metrics, step)
        if self._wandb is not None:
            # W&B's own step must only increase across stages, so the stage's step travels as a metric.
            self._wandb.log({**metrics, **({"step": step} if step is not None else {})})

    @property
    def wandb_location(self) -> str | None:
        """Where the W&B run is: its URL online, its folder offline (None when W&B is disabled)."""
        if self._wandb is None:
            return None
        return self._wandb.url or str(Path(self._wandb.dir).parent)

    def histogram(self, key: str, values: Any, step: int | None = None) -> None:
        """A W&B histogram of `values` (an array or tensor, e.g. log10 of a module's eigenvalues); metrics.jsonl gets
        their count, min, max and mean. Non-finite values are dropped."""
        array = np.asarray(values, dtype=np.float64).ravel()
        finite = array[np.isfinite(array)]
        stats = {"count": int(finite.size)}
        if finite.size:
            stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
        self._write({f"{key}/{name}": value for name, value in stats.items()}, step)
        if self._wandb is not None and finite.size:
            import wandb

            self._wandb.log({key: wandb.Histogram(finite), **({"step": step} if step is not None else {})})

    def progress(self, prefix: str, total: int) -> Callable[[str, int], None]:
        """An `on_batch(part, rows)` callback logging `<prefix>/<part>/rows` done, `<prefix>/<part>/fraction` of
        `total`, and the rate `<prefix>/rows_per_s` (factor-fitting progress: part is "covariance" or "lambda")."""
        done: dict[str, int] = {}
        start = time.perf_counter()

        def on_batch(part: str, rows: int) -> None:
            done[part] = done.get(part, 0) + rows
            elapsed = max(time.perf_counter() - start, 1e-9)
            self.log({f"{prefix}/{part}/rows": done[part], f"{prefix}/{part}/fraction": done[part] / max(1, total),
                      f"{prefix}/rows_per_s": sum(done.values()) / elapsed})

        return on_batch

    def table(self, key: str, columns: dict[str, Sequence[Any]]) -> None:
        """A `wandb.Table` from equal-length columns (e.g. the top-k); metrics.jsonl gets its row count."""
        rows = list(zip(*columns.values()))
        self._write({f"{key}/rows": len(rows)}, None)
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

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
        self.log({f"summary/{k}": v for k, v in values.items() if isinstance(v, (int, float, str))})
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
