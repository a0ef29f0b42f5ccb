"""The projected gradient store: one projected training gradient per document, as sharded Arrow IPC files.

    store/
      meta.json                 what the vectors are: projection seed and dims, model fingerprint, tracked modules,
                                dtype, the corpus shard plan, and every shard's file and document count
      progress.json             while writing: the expected meta and the finished shards (resume after a crash)
      shard-00000.arrow         Arrow IPC *file* format, one per corpus shard (data/corpus.py, `ShardPlan`):
                                doc_id int64, row int64 (global corpus row), gradient fixed_size_list<float16|float32>[D]

A document's vector is φ(∇L(z_m)) = Σ over its sequences and tokens of (P_out Ds_t)(P_in ā_t)ᵀ per module
(scoring/projection.py), accumulated in float32 and stored in `index.store_dtype`.

Reading is zero-copy: each shard file is memory-mapped and its gradient column becomes an [n, D] NumPy view of the
file in the stored dtype. (The `datasets` formats "numpy"/"torch" silently upcast float16 to float32: ENV.md; this
module never goes through them.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from distributed_astra.artifacts import atomic_path, check_meta, read_meta, write_json
from distributed_astra.data.corpus import Corpus, CorpusShard, CorpusStats, ShardPlan
from distributed_astra.data.sequences import SequenceFormat, iter_document_batches
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.projection import KroneckerProjection

STORE_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}
PROGRESS_FILE = "progress.json"


def shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.arrow"


def store_schema(dim: int, dtype: str) -> pa.Schema:
    arrow_type, _ = STORE_DTYPES[dtype]
    return pa.schema(
        [("doc_id", pa.int64()), ("row", pa.int64()), ("gradient", pa.list_(pa.field("item", arrow_type), dim))]
    )


def _check_finite(values: np.ndarray, source: torch.Tensor, shard: int) -> None:
    if not np.isfinite(values).all():
        bad = "holds NaN/Inf" if not bool(torch.isfinite(source).all()) else "overflows float16"
        raise DastraError(
            f"store shard {shard}: a projected gradient {bad}; set index.store_dtype: float32 "
            "(or check the model's dtype)"
        )


def _record_batch(doc_ids: np.ndarray, rows: np.ndarray, values: np.ndarray, dtype: str) -> pa.RecordBatch:
    flat = pa.array(values.reshape(-1), type=STORE_DTYPES[dtype][0])
    gradient = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.record_batch([pa.array(doc_ids), pa.array(rows), gradient], schema=store_schema(values.shape[1], dtype))


def document_vectors(
    batches: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sum per-sequence vectors into per-document vectors: (doc_ids [n], rows [n], vectors [n, D]).

    `batches` yields (batch with doc_id and row [B], vectors [B, D]); a document's sequences are contiguous in the
    stream (possibly across batches), so a document is emitted once the next one starts.
    """
    pending: tuple[int, int, torch.Tensor] | None = None
    for batch, vectors in batches:
        rows = batch["row"]
        unique, counts = torch.unique_consecutive(rows, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        summed = torch.zeros((len(unique), vectors.shape[1]), dtype=torch.float32)
        summed.index_add_(0, torch.repeat_interleave(torch.arange(len(unique)), counts), vectors.float())
        doc_ids = batch["doc_id"][first]
        if pending is not None:
            if int(unique[0]) == pending[1]:
                summed[0] += pending[2]
            else:
                yield torch.tensor([pending[0]]), torch.tensor([pending[1]]), pending[2][None]
        if len(unique) > 1:
            yield doc_ids[:-1], unique[:-1], summed[:-1]
        pending = (int(doc_ids[-1]), int(unique[-1]), summed[-1].clone())
    if pending is not None:
        yield torch.tensor([pending[0]]), torch.tensor([pending[1]]), pending[2][None]


def projected_batches(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    projection: KroneckerProjection,
    batches: Iterator[dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(batch, [B, D] projected sequence gradients) for every training batch (hooks, no weight gradients)."""
    for batch, capture in captured_batches(model, tracked, batches, dtype):
        yield batch, projection.project_tokens(capture.output_grads, capture.activations)


@dataclass(frozen=True)
class StoreWriter:
    """Everything needed to write (or resume) a store: the model, the projection, the corpus and its plan."""

    model: nn.Module
    tracked: dict[str, TrackedModule]
    tokenizer: Any
    corpus: Corpus
    plan: ShardPlan
    projection: KroneckerProjection
    sequence_format: SequenceFormat
    batch_size: int
    compute_dtype: torch.dtype
    store_dtype: str

    def write_shard(self, shard: CorpusShard, path: Path, stats: CorpusStats) -> int:
        """Project every document of `shard` into an Arrow IPC file at `path` (atomically); returns its documents.

        The shard is one record batch, so that a reader maps it as one [n, D] array without a copy.
        """
        documents = self.corpus.iter_documents(shard, stats)
        batches = iter_document_batches(documents, self.tokenizer, self.sequence_format, self.batch_size)
        vectors = projected_batches(self.model, self.tracked, self.projection, batches, self.compute_dtype)
        # One buffer per shard, filled in place: memory is bounded by data.shard_rows, whatever the corpus size.
        values = np.empty((shard.num_rows, self.projection.dim), dtype=STORE_DTYPES[self.store_dtype][1])
        doc_ids = np.empty(shard.num_rows, dtype=np.int64)
        rows = np.empty(shard.num_rows, dtype=np.int64)
        count = 0
        for ids, positions, summed in document_vectors(vectors):
            end = count + len(ids)
            values[count:end] = summed.numpy()
            _check_finite(values[count:end], summed, shard.shard_id)
            doc_ids[count:end], rows[count:end] = ids.numpy(), positions.numpy()
            count = end
        with atomic_path(path) as tmp:
            schema = store_schema(self.projection.dim, self.store_dtype)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as out:
                out.write_batch(_record_batch(doc_ids[:count], rows[:count], values[:count], self.store_dtype))
        return count


def write_store(
    writer: StoreWriter,
    folder: Path,
    meta: dict[str, Any],
    on_shard: Callable[[CorpusShard, int], None] | None = None,
) -> dict[str, Any]:
    """Write every shard of the plan that is not already done, then `meta.json`; returns the final meta.

    `meta` is what the store must match to be reused (fingerprint, tracked modules, projection); a folder with
    finished shards of the same meta and plan is resumed, anything else is replaced.
    """
    folder = Path(folder)
    expected = {**meta, "shard_plan": writer.plan.fingerprint}
    progress_path = folder / PROGRESS_FILE
    done: dict[str, int] = {}
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress.get("expected") == json.loads(json.dumps(expected)):
            done = {k: int(v) for k, v in progress["done"].items() if (folder / shard_file(int(k))).is_file()}
    if not done and folder.exists():
        for stale in list(folder.glob("shard-*.arrow")) + [folder / "meta.json", progress_path]:
            stale.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # the store is incomplete until meta.json is written again
    stats = CorpusStats()
    for shard in writer.plan.shards:
        if str(shard.shard_id) in done:
            continue
        done[str(shard.shard_id)] = writer.write_shard(shard, folder / shard_file(shard.shard_id), stats)
        write_json(progress_path, {"expected": expected, "done": done})
        if on_shard is not None:
            on_shard(shard, done[str(shard.shard_id)])
    final = {
        **expected,
        "store_dtype": writer.store_dtype,
        "dim": writer.projection.dim,
        "num_documents": sum(done.values()),
        "shards": [{"file": shard_file(s.shard_id), "num_documents": done[str(s.shard_id)]} for s in writer.plan.shards],
        "skipped_rows": {"empty": stats.skipped_empty, "non_utf8": stats.skipped_non_utf8},
    }
    write_json(folder / "meta.json", final)
    progress_path.unlink(missing_ok=True)
    return final


# --------------------------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class StoreShard:
    doc_ids: np.ndarray  # [n] int64
    rows: np.ndarray  # [n] int64
    vectors: np.ndarray  # [n, D] in the stored dtype: a read-only view of the memory-mapped file


class GradientStore:
    """A finished store folder: its meta and zero-copy access to each shard."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = meta

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    def read_shard(self, index: int) -> StoreShard:
        """One shard, memory-mapped: no copy of the gradients, which stay in the stored dtype."""
        path = self.folder / self.meta["shards"][index]["file"]
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches != 1:
            raise DastraError(f"gradient store shard {path} is not a single record batch; re-run `dastra index`")
        batch = reader.get_batch(0)
        values = batch.column("gradient").values.to_numpy(zero_copy_only=True).reshape(-1, self.dim)
        return StoreShard(batch.column("doc_id").to_numpy(), batch.column("row").to_numpy(), values)

    def iter_shards(self) -> Iterator[StoreShard]:
        for index in range(len(self.meta["shards"])):
            yield self.read_shard(index)


def open_store(folder: Path, expected: dict[str, Any]) -> GradientStore:
    """A finished store whose meta matches `expected` (else the error names the first field that differs)."""
    meta = read_meta(folder, "gradient store", "index")
    check_meta(meta, expected, "gradient store", "index")
    if not all((Path(folder) / s["file"]).is_file() for s in meta["shards"]):
        raise DastraError(f"gradient store {folder}: a shard file is missing; re-run `dastra index`")
    return GradientStore(Path(folder), meta)


def store_bytes(folder: Path) -> int:
    return sum(os.path.getsize(p) for p in Path(folder).glob("shard-*.arrow"))
