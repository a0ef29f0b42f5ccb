"""Sharded, resumable scoring (seeds §1, Eq 2) on independent Ray actors, shards handed out on demand.

    corpus --shard_plan(data.shard_rows)--> shards 0..S-1 (stable ids: file + row range)
    driver: queue of unfinished shards --> ScoringWorker actors (each: the model, the directions via the object store)
    each finished shard --> scores/shards/shard-<id>.parquet (atomic) + an entry in scores/manifest.json (atomic)
    all shards done --> merge the per-shard top-k --> topk.parquet (the same table as the single-process `score`)

Scoring actors are not ranks of a process group: each holds the model replicated, so a dead actor is restarted by
Ray (`ray.max_restarts`) and its shard retried on it (`max_task_retries`), while the others keep going. A document is
one corpus row and never spans two shards, so merging the per-shard top-k's gives the exact top-k. A re-run reads
the manifest and skips every shard recorded there (when the directions, the corpus plan and top_k are the same).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from distributed_astra.artifacts import atomic_path, write_json
from distributed_astra.config import Config
from distributed_astra.curvature.covariance import STAT_DTYPES, batch_to_device, product_dtype
from distributed_astra.data.corpus import CorpusShard, ShardPlan, open_corpus
from distributed_astra.data.sequences import SequenceFormat, iter_training_batches
from distributed_astra.distributed.cluster import note, require_resources, wait_all, worker_env
from distributed_astra.errors import DastraError
from distributed_astra.models.load import load_causal_lm, load_tokenizer
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.progress import progress_bar
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.topk import StreamingTopK

MANIFEST = "manifest.json"
IN_FLIGHT_PER_WORKER = 2  # one shard running, one queued: a worker never waits for the driver between shards


class ScoringWorker:
    """A Ray actor: the model (replicated, frozen), its tracked modules and the solved directions."""

    def __init__(self, cfg: Config, source: str, directions: dict[str, torch.Tensor]) -> None:
        torch.set_num_threads(cfg.ray.cpus_per_worker)
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if cfg.ray.use_gpu else torch.device("cpu")
        self.model = load_causal_lm(source, None, cfg.model.dtype).to(self.device)
        self.tokenizer = load_tokenizer(source, None)
        self.tracked = select_tracked_modules(self.model, cfg.model.tracked_modules)
        compute = product_dtype(self.model, STAT_DTYPES[cfg.factors.dtype])
        self.directions = {n: x.to(device=self.device, dtype=compute) for n, x in directions.items()}
        self.compute = compute

    def pid(self) -> int:
        return os.getpid()

    def score_shard(self, corpus: str, shard: CorpusShard) -> dict[str, Any]:
        """The top-k documents of one shard per query: scores [Q, k'] and document keys [Q, k'] (k' = min(k, docs))."""
        started = time.perf_counter()
        data = self.cfg.data
        batches = (
            batch_to_device(b, self.device)
            for b in iter_training_batches(
                open_corpus(corpus, data.text_column, data.id_column, data.split), self.tokenizer,
                SequenceFormat.from_data(data), self.cfg.scoring.batch_size, shard=shard,
            )
        )
        num_queries = next(iter(self.directions.values())).shape[0]
        top = StreamingTopK(num_queries, self.cfg.scoring.top_k)
        sequences = 0
        for batch, capture in captured_batches(self.model, self.tracked, batches, self.compute):
            scores = sequence_scores(capture.output_grads, capture.activations, self.directions)
            top.update(batch["doc_id"].cpu(), scores.cpu())
            sequences += len(batch["doc_id"])
        scores, doc_ids = top.finish()
        return {
            "shard_id": shard.shard_id, "scores": scores, "doc_ids": doc_ids, "num_documents": top.num_documents,
            "num_sequences": sequences, "seconds": time.perf_counter() - started, "pid": os.getpid(),
        }


def _shard_file(scores_dir: Path, shard_id: int) -> Path:
    return scores_dir / "shards" / f"shard-{shard_id:06d}.parquet"


def _write_shard(scores_dir: Path, result: dict[str, Any]) -> Path:
    """One shard's top-k: (query position, rank, document key, score) rows; topk_table turns them into ids."""
    scores, doc_ids = result["scores"], result["doc_ids"]
    num_queries, k = scores.shape
    table = pa.table({
        "query": torch.arange(num_queries).repeat_interleave(k).numpy(),
        "rank": torch.arange(1, k + 1).repeat(num_queries).numpy(),
        "doc_key": doc_ids.flatten().numpy(),
        "score": scores.flatten().numpy(),
    })
    path = _shard_file(scores_dir, result["shard_id"])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(scores_dir: Path) -> dict[str, Any] | None:
    import json

    path = scores_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def finished_shards(scores_dir: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Shards recorded in the manifest for the same inputs (`meta`) whose files are present; {} otherwise."""
    manifest = read_manifest(scores_dir)
    if manifest is None:
        return {}
    if manifest.get("meta") != meta:
        note(f"{scores_dir / MANIFEST} was written for other directions, corpus or top_k: scoring every shard again")
        return {}
    return {sid: rec for sid, rec in manifest.get("shards", {}).items() if _shard_file(scores_dir, int(sid)).is_file()}


def merge_shards(
    scores_dir: Path, shard_ids: list[int], num_queries: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k per query from the per-shard top-k files: (scores [Q, k], document keys [Q, k]), best first."""
    tables = [pq.read_table(_shard_file(scores_dir, sid)) for sid in sorted(shard_ids)]
    table = pa.concat_tables(tables)
    per_query = table.num_rows // num_queries if num_queries else 0
    queries = torch.as_tensor(table.column("query").to_numpy())
    scores = torch.as_tensor(table.column("score").to_numpy())
    doc_ids = torch.as_tensor(table.column("doc_key").to_numpy())
    order = torch.argsort(queries, stable=True)  # shard order kept within each query
    scores = scores[order].view(num_queries, per_query)
    doc_ids = doc_ids[order].view(num_queries, per_query)
    best, index = torch.topk(scores, min(k, per_query), dim=1)
    return best, torch.gather(doc_ids, 1, index)


def score_shards(
    cfg: Config,
    source: str,
    corpus: str,
    plan: ShardPlan,
    directions: dict[str, torch.Tensor],
    scores_dir: Path,
    meta: dict[str, Any],
    on_shard: Callable[[int, list[int]], None] | None = None,
) -> dict[str, Any]:
    """Score every unfinished shard on `ray.num_workers` actors; returns the final manifest.

    `on_shard(shard_id, worker_pids)` is called after each shard is recorded (progress, fault-injection tests).
    """
    rc = cfg.ray
    done = finished_shards(scores_dir, meta)
    todo = deque(s for s in plan.shards if str(s.shard_id) not in done)
    if done:
        note(f"resuming: {len(done)} of {len(plan.shards)} shards already scored (scores/{MANIFEST}), "
             f"{len(todo)} to go")
    manifest = {"meta": meta, "plan": plan.to_json(), "shards": dict(done)}
    write_json(scores_dir / MANIFEST, manifest)
    if todo:
        require_resources(rc, "scoring")
        directions_ref = ray.put(directions)  # once; every actor (and every restart) reads it from the object store
        remote = ray.remote(ScoringWorker).options(
            num_cpus=rc.cpus_per_worker, num_gpus=1 if rc.use_gpu else 0, max_restarts=rc.max_restarts,
            max_task_retries=rc.max_restarts, runtime_env={"env_vars": worker_env(rc)},
        )
        workers = [remote.remote(cfg, source, directions_ref) for _ in range(min(rc.num_workers, len(todo)))]
        try:
            pids = wait_all([w.pid.remote() for w in workers], rc.timeout_s, "starting the scoring workers")
            in_flight: dict[ray.ObjectRef, tuple[Any, CorpusShard]] = {}

            def submit(worker) -> None:
                if todo:
                    shard = todo.popleft()
                    in_flight[worker.score_shard.remote(corpus, shard)] = (worker, shard)

            for worker in workers:
                for _ in range(IN_FLIGHT_PER_WORKER):
                    submit(worker)
            with progress_bar("score shards", len(plan.shards), "shards") as advance:
                advance(len(done))
                while in_flight:
                    ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=rc.timeout_s)
                    if not ready:
                        raise DastraError(
                            f"scoring: no shard finished within ray.timeout_s={rc.timeout_s:g} s; raise it or check "
                            "the workers' logs"
                        )
                    worker, shard = in_flight.pop(ready[0])
                    try:
                        result = ray.get(ready[0])
                    except RayActorError:
                        raise DastraError(
                            f"scoring: a worker died more than ray.max_restarts={rc.max_restarts} times (last shard "
                            f"{shard.shard_id}); finished shards are kept in scores/{MANIFEST}: re-run to resume"
                        ) from None
                    except RayTaskError as exc:
                        reason = str(exc).strip().splitlines()[-1]
                        raise DastraError(f"scoring shard {shard.shard_id} failed: {reason}") from None
                    path = _write_shard(scores_dir, result)
                    manifest["shards"][str(shard.shard_id)] = {
                        "file": str(path.relative_to(scores_dir)), "path": shard.path,
                        "rows": [shard.row_start, shard.row_stop], "num_documents": result["num_documents"],
                        "num_sequences": result["num_sequences"], "seconds": round(result["seconds"], 4),
                        "worker_pid": result["pid"], "finished_at": time.time(),
                    }
                    write_json(scores_dir / MANIFEST, manifest)
                    advance(1)
                    if on_shard is not None:
                        on_shard(shard.shard_id, pids)
                    submit(worker)
        finally:
            for worker in workers:
                ray.kill(worker)
    return manifest
