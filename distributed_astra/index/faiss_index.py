"""faiss inner-product indexes over a gradient store: exact flat, or IVF-PQ re-ranked by IndexRefineFlat.

    index = build_index(store, cfg.index)        # vectors streamed shard by shard, converted to float32 per shard
    scores, positions = search_index(index, queries, k)   # positions index the store's documents in shard order

- flat: `IndexFlatIP`, exact maximum inner product.
- ivfpq: `IndexIVFPQ` (inner-product metric) trained on an even sample of `index.train_size` vectors, wrapped in
  `IndexRefineFlat`, which keeps the vectors and re-ranks `refine_factor` x k PQ candidates exactly. IVF-PQ alone
  has poor recall on gradients (ENV.md: 0.05-0.22); with the refinement, recall@10 is ~1.
- device: a GPU index when faiss has GPUs (`index.device: auto | gpu`); `gpu` without one warns and stays on CPU.
  Indexes are saved on CPU (`faiss.write_index`) and moved to the GPU after loading.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import faiss
import numpy as np

from distributed_astra.config import IndexConfig
from distributed_astra.errors import DastraError
from distributed_astra.index.store import GradientStore

INDEX_FILE = "index.faiss"


def index_kind(cfg: IndexConfig, num_documents: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "ivfpq" if num_documents >= cfg.ivfpq_min_documents else "flat"


def num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_device(index: faiss.Index, device: str) -> faiss.Index:
    """The index on all GPUs when asked and available; `gpu` without a faiss GPU build warns and keeps the CPU."""
    if device == "cpu":
        return index
    if num_gpus() == 0:
        if device == "gpu":
            warnings.warn("index.device is 'gpu' but faiss sees no GPU (faiss-cpu build?): using the CPU index", stacklevel=2)
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # an index type faiss cannot clone to the GPU
        warnings.warn(f"faiss could not move the index to the GPU ({exc}); using the CPU index", stacklevel=2)
        return index


def _pq_m(cfg: IndexConfig, dim: int) -> int:
    if cfg.pq_m is not None:
        if dim % cfg.pq_m:
            raise DastraError(f"index.pq_m = {cfg.pq_m} must divide the projected dimension {dim}")
        return cfg.pq_m
    return max(m for m in range(1, max(dim // 8, 1) + 1) if dim % m == 0)


def _training_sample(store: GradientStore, size: int) -> np.ndarray:
    """An even (deterministic) sample of at most `size` vectors, gathered shard by shard, float32."""
    step = max(1, math.ceil(store.num_documents / size))
    parts, position = [], 0
    for shard in store.iter_shards():
        first = (-position) % step
        parts.append(np.asarray(shard.vectors[first::step], dtype=np.float32))
        position += len(shard.vectors)
    return np.concatenate(parts)[:size]


def build_index(store: GradientStore, cfg: IndexConfig) -> tuple[faiss.Index, dict[str, object]]:
    """The index over every stored vector (in shard order) and what was built (kind, nlist, pq_m...)."""
    dim, count = store.dim, store.num_documents
    if count == 0:
        raise DastraError("the gradient store holds no document: check data.corpus")
    kind = index_kind(cfg, count)
    info: dict[str, object] = {"kind": kind, "num_documents": count, "dim": dim}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = cfg.nlist or max(1, int(4 * math.sqrt(count)))
        nlist = min(nlist, max(1, count // 39))  # faiss wants ≥ 39 training points per list
        m = _pq_m(cfg, dim)
        quantizer = faiss.IndexFlatIP(dim)
        ivfpq = faiss.IndexIVFPQ(quantizer, dim, nlist, m, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
        sample = _training_sample(store, cfg.train_size)
        if len(sample) < 2 ** cfg.pq_bits:
            raise DastraError(
                f"IVF-PQ needs at least {2 ** cfg.pq_bits} training vectors (index.pq_bits = {cfg.pq_bits}), "
                f"the store has {len(sample)}: use index.kind: flat"
            )
        ivfpq.train(sample)
        ivfpq.nprobe = cfg.nprobe
        index = faiss.IndexRefineFlat(ivfpq)
        index.k_factor = float(cfg.refine_factor)
        info.update({"nlist": nlist, "pq_m": m, "pq_bits": cfg.pq_bits})
    for shard in store.iter_shards():
        if len(shard.vectors):
            index.add(np.asarray(shard.vectors, dtype=np.float32))
    return index, info


def save_index(index: faiss.Index, folder: Path) -> None:
    faiss.write_index(index, str(Path(folder) / INDEX_FILE))


def load_index(folder: Path, cfg: IndexConfig) -> faiss.Index:
    """Read the saved index, set the search parameters of `cfg` (nprobe, refine_factor), move it to the device."""
    index = faiss.read_index(str(Path(folder) / INDEX_FILE))
    if isinstance(index, faiss.IndexRefineFlat):
        index.k_factor = float(cfg.refine_factor)
        faiss.downcast_index(index.base_index).nprobe = cfg.nprobe
    return to_device(index, cfg.device)


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], positions [Q, k]) of the k largest inner products; position -1 where fewer exist."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
