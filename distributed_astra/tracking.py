"""One logger for every stage: always a local `metrics.jsonl`, plus W&B (offline unless configured online).

Online mode without an API key (or with `WANDB_MODE=offline` in the environment) falls back to offline at once with
a warning, so a run never waits on the network.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from distributed_astra.config import TrackingConfig

log = logging.getLogger(__name__)


def _wandb_mode(requested: str) -> str:
    if requested == "online" and (os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")):
        log.warning("tracking.wandb_mode is online but no WANDB_API_KEY is set (or WANDB_MODE=offline): logging offline")
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
                job_type=job,
                dir=str(self.run_dir),
                config=config,
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True, init_timeout=30),
            )

    def log(self, metrics: dict[str, float | int | str], step: int | None = None) -> None:
        record = {"job": self.job, "time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            # W&B's own step must only increase across stages, so the stage's step travels as a metric.
            self._wandb.log({**metrics, **({"step": step} if step is not None else {})})

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
