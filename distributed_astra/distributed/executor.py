"""The Ray executor (execution.py's protocol on a cluster): rank functions on a DeepSpeed worker group, shard
functions on restartable Ray actors.

    executor = RayExecutor(model_source, fingerprint)   # nothing starts until the first call
    executor.map(rank_fit, corpus, cfg=cfg, what="fit")  # on the worker group: N ranks, one torch.distributed group
    executor.map_shards(score_shard, shards, directions, cfg=cfg, what="score", on_result=write)
    executor.close()                                     # the group, the actors, and a Ray this executor started

One worker group serves every `map` of the executor; it is rebuilt when the model or Ray settings change and
reloaded when only the DeepSpeed settings do. A rank that dies during a `map` (`WorkerDied`) costs that step: the
group is rebuilt and the step re-run, at most `ray.max_restarts` times; the steps are deterministic, so the result
is the one an undisturbed run gives. `map_shards` releases it first (its actors need the same CPUs/GPUs)
and runs each shard on one of `ray.num_workers` independent actors, each holding the model replicated: a dead
actor is restarted by Ray (`ray.max_restarts`) and its shard retried on it (`max_task_retries`), while the others
keep going.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from distributed_astra.config import Config
from distributed_astra.distributed import cluster
from distributed_astra.distributed.cluster import note, require_resources, wait_all, worker_env
from distributed_astra.distributed.worker_group import WorkerGroup
from distributed_astra.errors import DastraError, WorkerDied
from distributed_astra.execution import Progress, Rank
from distributed_astra.models.load import load_causal_lm, load_tokenizer
from distributed_astra.models.modules import select_tracked_modules

IN_FLIGHT_PER_WORKER = 2  # one shard running, one queued: a worker never waits for the driver between shards


class ShardWorker:
    """A Ray actor for shard functions: one rank of its own (no process group), the model replicated and frozen."""

    def __init__(self, cfg: Config, source: str) -> None:
        torch.set_num_threads(cfg.ray.cpus_per_worker)
        device = torch.device("cuda", 0) if cfg.ray.use_gpu else torch.device("cpu")
        model = load_causal_lm(source, None, cfg.model.dtype).to(device)
        self.rank = Rank(0, 1, cfg, model, select_tracked_modules(model, cfg.model.tracked_modules),
                         load_tokenizer(source, None))

    def pid(self) -> int:
        return os.getpid()

    def run(self, cfg: Config, fn: Callable[..., Any], shard: Any, *args: Any) -> Any:
        self.rank.cfg = cfg
        return fn(self.rank, shard, *args)


class RayExecutor:
    """Rank functions on a worker group of `ray.num_workers` ranks; shard functions on restartable actors."""

    def __init__(self, source: str, fingerprint: str | None = None) -> None:
        self.source = source
        self.fingerprint = fingerprint
        self.group: WorkerGroup | None = None
        self.key: tuple | None = None
        self.owns_ray = False
        self.pids: list[int] = []
        self.world_size = 0
        self.stage = 0
        self.restarts = 0  # worker groups rebuilt after a rank died

    def _connect(self, cfg: Config) -> None:
        if not ray.is_initialized():
            self.owns_ray = cluster.connect(cfg.ray)

    def group_for(self, cfg: Config) -> WorkerGroup:
        """The worker group, (re)built when the model or Ray settings changed, reloaded when DeepSpeed's did."""
        self._connect(cfg)
        rc = cfg.ray
        key = (self.source, cfg.section_hash("model"), rc.address, rc.num_workers, rc.use_gpu, rc.cpus_per_worker)
        if self.group is not None and self.key != key:
            self.release_group()
        if self.group is None:
            started = time.perf_counter()
            self.group, self.key = WorkerGroup(cfg, self.source, self.fingerprint), key
            note(f"{rc.num_workers} ranks ready in {time.perf_counter() - started:.1f} s")
        elif self.group.cfg.deepspeed != cfg.deepspeed:
            self.group.load(cfg, self.fingerprint)
        self.world_size, self.stage = rc.num_workers, self.group.stage
        return self.group

    def map(self, fn: Callable[..., Any], *args: Any, cfg: Config, what: str, progress: Progress | None = None
            ) -> list[Any]:
        restarts = 0
        while True:
            try:
                return self.group_for(cfg).call(fn, *args, cfg=cfg, what=what)
            except WorkerDied as exc:
                self.release_group()
                if restarts == cfg.ray.max_restarts:
                    raise DastraError(
                        f"{exc}; ranks died {restarts + 1} times in this step, ray.max_restarts={restarts}: check the "
                        "ranks' memory and logs or raise ray.max_restarts; finished work is kept: re-run to resume"
                    ) from None
                restarts += 1
                self.restarts += 1
                note(f"{exc}: rebuilding the {cfg.ray.num_workers} ranks and re-running the step "
                     f"(restart {restarts} of ray.max_restarts={cfg.ray.max_restarts})")

    def map_shards(
        self, fn: Callable[..., Any], shards: Iterable[Any], *args: Any, cfg: Config, what: str,
        on_result: Callable[[Any, Any], None],
    ) -> None:
        rc = cfg.ray
        todo = deque(shards)
        if not todo:
            return
        self.release_group()  # the ranks' CPUs/GPUs go to the shard actors
        self._connect(cfg)
        require_resources(rc, what)
        refs = [a if isinstance(a, (str, int, float, bool, type(None))) else ray.put(a) for a in args]  # put once
        remote = ray.remote(ShardWorker).options(
            num_cpus=rc.cpus_per_worker, num_gpus=1 if rc.use_gpu else 0, max_restarts=rc.max_restarts,
            max_task_retries=rc.max_restarts, runtime_env={"env_vars": worker_env(rc)},
        )
        cfg_ref = ray.put(cfg)
        workers = [remote.remote(cfg, self.source) for _ in range(min(rc.num_workers, len(todo)))]
        try:
            self.pids = wait_all([w.pid.remote() for w in workers], rc.timeout_s, f"starting the {what} workers")
            in_flight: dict[ray.ObjectRef, tuple[Any, Any]] = {}

            def submit(worker) -> None:
                if todo:
                    shard = todo.popleft()
                    in_flight[worker.run.remote(cfg_ref, fn, shard, *refs)] = (worker, shard)

            for worker in workers:
                for _ in range(IN_FLIGHT_PER_WORKER):
                    submit(worker)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=rc.timeout_s)
                if not ready:
                    raise DastraError(
                        f"{what}: no shard finished within ray.timeout_s={rc.timeout_s:g} s; raise it or check the "
                        "workers' logs"
                    )
                worker, shard = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except RayActorError:
                    raise DastraError(
                        f"{what}: a worker died more than ray.max_restarts={rc.max_restarts} times (last shard "
                        f"{getattr(shard, 'shard_id', shard)}); finished shards are kept: re-run to resume"
                    ) from None
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), DastraError) else None
                    reason = str(cause) if cause else str(exc).strip().splitlines()[-1]
                    raise DastraError(f"{what}: shard {getattr(shard, 'shard_id', shard)} failed: {reason}") from None
                on_result(shard, result)
                submit(worker)
        finally:
            for worker in workers:
                ray.kill(worker)
            self.pids = []

    def worker_pids(self) -> list[int]:
        """The processes of the ranks or shard actors now running (fault-injection tests)."""
        return list(self.group.pids) if self.group is not None else list(self.pids)

    def release_group(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group, self.key = None, None

    def close(self) -> None:
        """Release the worker group and shut down a Ray this executor started."""
        self.release_group()
        if self.owns_ray:
            cluster.shutdown()
            self.owns_ray = False
