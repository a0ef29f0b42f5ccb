"""Retraining for the LDS ground truth, as Ray tasks (one CPU each), cached on disk and resumable.

Cache layout under `<eval.cache_dir>/<task>-<recipe hash>/`:
    models/model<e>.pt                        the ensemble's e-th model, trained on all N examples with seed e
    retrain/beta<β>-seed<s>/s<j>-r<r>.json    f on every query after training on subset S_j with retraining seed r

Every file is written atomically (`artifacts.atomic_path`) as soon as its Ray task returns, so an interrupted run
keeps what finished and the next run only trains what is missing. A run whose loss or measurements are not finite
is recorded as diverged (and never retried); the harness leaves it out and reports the count.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distributed_astra.artifacts import atomic_path, write_json
from distributed_astra.config import RayConfig
from distributed_astra.errors import DastraError
from distributed_astra.eval.tasks import Task, TrainedModel, build_task

RETRAIN_SEED_BASE = 1_000_000  # retraining seeds never coincide with the ensemble's seeds 0..E-1


def retrain_seed(subset: int, repeat: int) -> int:
    return RETRAIN_SEED_BASE + 1000 * subset + repeat


def subset_indices(num_train: int, fraction: float, seed: int, subset: int) -> torch.Tensor:
    """S_j: ⌊βN⌋ training indices drawn uniformly without replacement, depending only on (seed, j), sorted."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + subset)
    size = int(math.floor(fraction * num_train))
    return torch.randperm(num_train, generator=generator)[:size].sort().values


def train_and_measure(
    task_name: str, data_dir: str, overrides: dict, train_index: torch.Tensor, seed: int, keep_model: bool
) -> dict:
    """The body of one Ray task: train from scratch, measure f on the queries (one thread)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    task = build_task(task_name, Path(data_dir), overrides)
    trained = task.train(train_index, seed)
    measurements = task.measure(trained.checkpoints[-1]) if not trained.diverged else None
    diverged = trained.diverged or not bool(torch.isfinite(measurements).all())
    record = {
        "seed": seed,
        "final_loss": trained.final_loss if math.isfinite(trained.final_loss) else str(trained.final_loss),
        "diverged": diverged,
        "measurements": None if diverged else measurements.tolist(),
        "seconds": time.perf_counter() - start,
    }
    if keep_model and not diverged:
        record["trained"] = trained
    return record


@dataclass(frozen=True)
class Job:
    key: str  # "model<e>" or "s<j>-r<r>"
    path: Path
    train_index: torch.Tensor
    seed: int
    keep_model: bool


class RetrainCache:
    """Where one task's retrained models and measurements live (see the module docstring)."""

    def __init__(self, cache_dir: Path, task: Task, fraction: float, subset_seed: int) -> None:
        self.root = Path(cache_dir) / f"{task.name}-{task.recipe_hash()}"
        self.task = task
        self.fraction = fraction
        self.subset_seed = subset_seed
        self.retrain_dir = self.root / "retrain" / f"beta{fraction:g}-seed{subset_seed}"

    def model_job(self, e: int) -> Job:
        return Job(f"model{e}", self.root / "models" / f"model{e:02d}.pt", torch.arange(self.task.num_train), e, True)

    def retrain_job(self, j: int, r: int) -> Job:
        index = subset_indices(self.task.num_train, self.fraction, self.subset_seed, j)
        return Job(f"s{j}-r{r}", self.retrain_dir / f"s{j:04d}-r{r:02d}.json", index, retrain_seed(j, r), False)

    def store(self, job: Job, record: dict) -> None:
        if job.keep_model:
            if record["diverged"]:
                raise DastraError(
                    f"the {self.task.name} model with seed {job.seed} (trained on all data) diverged "
                    f"(final loss {record['final_loss']}): fix the task's recipe"
                )
            trained: TrainedModel = record["trained"]
            with atomic_path(job.path) as tmp:
                torch.save({"checkpoints": trained.checkpoints, "learning_rates": trained.learning_rates,
                            "final_loss": trained.final_loss}, tmp)
        else:
            write_json(job.path, {**record, "subset": job.key})

    def load_model(self, e: int) -> TrainedModel:
        data = torch.load(self.model_job(e).path)
        return TrainedModel(data["checkpoints"], data["learning_rates"], data["final_loss"])

    def load_record(self, j: int, r: int) -> dict:
        return json.loads(self.retrain_job(j, r).path.read_text())


def run_jobs(cache: RetrainCache, jobs: list[Job], ray_cfg: RayConfig, on_done: Callable[[dict], None]) -> int:
    """Run the jobs whose cache file is missing as Ray tasks (num_cpus=1 each); store each result as it arrives.

    Ray is joined or started with `distributed.cluster.connect(ray_cfg)` (ray.address, or an embedded Ray with
    ray.num_cpus CPUs). Returns the number of jobs run. A failed task, or none finishing within ray.timeout_s,
    raises `DastraError` naming it; finished results stay cached.
    """
    missing = [job for job in jobs if not job.path.is_file()]
    if not missing:
        return 0
    import ray

    from distributed_astra.distributed.cluster import connect  # deferred: Ray, for the LDS retraining only

    connect(ray_cfg)
    remote = ray.remote(num_cpus=1, max_retries=0)(train_and_measure)
    data_dir = str(cache.task.data_dir)
    overrides = cache.task.overrides
    pending = {remote.remote(cache.task.name, data_dir, overrides, job.train_index, job.seed, job.keep_model): job
               for job in missing}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=ray_cfg.timeout_s)
        if not done:
            raise DastraError(f"no retraining task finished within ray.timeout_s = {ray_cfg.timeout_s:g} s; "
                              "re-run to resume from the cache")
        job = pending.pop(done[0])
        try:
            record = ray.get(done[0])
        except Exception as exc:  # a dead worker or an error inside the task: name the job, keep the cache
            for ref in pending:
                ray.cancel(ref)
            raise DastraError(
                f"retraining {cache.task.name} {job.key} (seed {job.seed}) failed: {str(exc).splitlines()[0]}; "
                "finished runs are cached, re-run to resume"
            ) from None
        cache.store(job, record)
        on_done(record)
    return len(missing)
