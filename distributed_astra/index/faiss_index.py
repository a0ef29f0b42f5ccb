"""faiss inner-product indexes over a gradient store: exact flat, IVF-Flat, or IVF-PQ with an exact re-ranking.

    index = build_index(store, cfg.index)        # vectors streamed shard by shard, converted to float32 per shard
    scores, positions = search_index(index, queries, k)   # positions index the store's documents in shard order

- flat: `IndexFlatIP`, exact maximum inner product. `index.kind: auto` below `index.ivf_min_documents` (100k).
- ivfflat: norm-banded IVF lists probed by an upper bound on their best inner product (`_ivf_lists`; `_build_ivfpq`
  says why), float32 vectors in `IndexIVFFlat`, exact scores. `auto` from 100k documents: on a 100k synthetic
  store, recall@10 against flat 0.95 at the default probing (64 of 1,264 lists), 2.3x faster than a flat search
  batched over 80 queries and 20x for one query at a time, on one CPU thread (docs/results/retrieval.md).
- ivfpq: the same lists with PQ codes of the vectors, wrapped in `IndexRefine` over a flat inner-product copy that
  re-ranks `refine_factor` x k PQ candidates exactly. Recall@10 against flat is 0.97 on the demo store (4,040
  vectors) but 0.71 on the 100k synthetic store, where the PQ ranking is the limit (finer sub-vectors: 0.84 at 4
  dims), and the refine copy is as large as the flat index: kept for when it is asked for. `index.pq_m` None: the
  largest divisor of D that is at most D / 8, i.e. 8-dimensional sub-vectors (256 for D = 2,048).
- probing (both IVF kinds): `index.nprobe`, else the larger of the calibrated nprobe and the floor
  max(`min_nprobe`, ceil(`probe_fraction` x nlist)). Calibrated at build time (`calibrate_nprobe`): the fewest lists
  whose recall@10 against the exact top-10 reaches 1 - (1 - `index.target_recall`) / `CALIBRATION_MISS_RATIO` on
  `CALIBRATION_QUERIES` sampled documents used
  as leave-one-out queries (EK-FAC-preconditioned like real queries: index/calibration.py); the chosen nprobe, the
  recall it reached and the sweep are in index/meta.json.
- device: a GPU index when faiss has GPUs (`index.device: auto | gpu`); `gpu` without one warns and stays on CPU.
  Indexes are saved on CPU (`faiss.write_index`) and moved to the GPU after loading.
"""

from __future__ import annotations

import errno
import json
import math
import os
import warnings
from pathlib import Path

import faiss
import numpy as np

from distributed_astra.config import IndexConfig
from distributed_astra.errors import DastraError
from distributed_astra.index.store import GradientStore

INDEX_FILE = "index.faiss"
# Build-time calibration of the IVF probing toward `index.target_recall` (recall@10 against flat for real queries).
# Real solved directions miss about twice as often as the calibration's preconditioned training gradients at the same
# nprobe (demo store, seed 0: misses 0.046 -> 0.096, 0.031 -> 0.065, 0.024 -> 0.048, 0.019 -> 0.035 at 46-60 of 96
# lists), so the calibration aims at 1 - (1 - index.target_recall) / CALIBRATION_MISS_RATIO (0.975).
CALIBRATION_MISS_RATIO = 2.0
CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
# recorded in index/meta.json and checked by `search`: an index of an older layout is refused, naming this field
INDEX_FORMATS = {"flat": "flat-ip/1", "ivfflat": "ivfflat-norm-bands/1", "ivfpq": "ivfpq-norm-bands/2"}


def index_kind(cfg: IndexConfig, num_documents: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "ivfflat" if num_documents >= cfg.ivf_min_documents else "flat"


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


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.astype(np.float64), axis=1)


def _augment(x: np.ndarray, extra: np.ndarray | None, width: int) -> np.ndarray:
    """[x, extra, 0...]: `width` more columns, the first holding `extra` (zeros when None), float32."""
    out = np.zeros((len(x), x.shape[1] + width), dtype=np.float32)
    out[:, : x.shape[1]] = x
    if extra is not None:
        out[:, x.shape[1]] = extra
    return out


class _NormBandedLists:
    """The IVF partition: norm bands (equal counts in the training sample), spherical k-means of directions per band.

    `assign` maps vectors to list ids; `bounds` gives each list's centre c (mean of its members) and radius R (largest
    distance of a member to c), so that max over the list of <q, x> <= <q, c> + |q| R (Cauchy-Schwarz).
    """

    def __init__(self, sample: np.ndarray, nlist: int, bands: int, niter: int) -> None:
        norms = _norms(sample)
        bands = max(1, min(bands, nlist, len(sample) // 39))
        self.edges = np.quantile(norms, np.linspace(0, 1, bands + 1)[1:-1])  # inner edges
        band_of = np.searchsorted(self.edges, norms, side="right")
        self.directions: list[faiss.IndexFlatIP] = []
        self.offsets: list[int] = []
        total = 0
        for band in range(bands):
            members = sample[band_of == band]
            units = members / np.maximum(_norms(members), 1e-30)[:, None].astype(np.float32)
            k = max(1, min(math.ceil(nlist / bands), len(members) // 39))
            centroids = np.zeros((1, sample.shape[1]), np.float32)
            if k > 1:
                kmeans = faiss.Kmeans(sample.shape[1], k, niter=niter, spherical=True, seed=1234)
                kmeans.train(np.ascontiguousarray(units, dtype=np.float32))
                centroids = kmeans.centroids
            flat = faiss.IndexFlatIP(sample.shape[1])
            flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
            self.directions.append(flat)
            self.offsets.append(total)
            total += len(centroids)
        self.nlist = total

    def assign(self, x: np.ndarray) -> np.ndarray:
        band_of = np.searchsorted(self.edges, _norms(x), side="right")
        lists = np.zeros(len(x), dtype=np.int64)
        for band in np.unique(band_of):
            rows = np.flatnonzero(band_of == band)
            _, nearest = self.directions[band].search(np.ascontiguousarray(x[rows]), 1)  # cosine up to |x|
            lists[rows] = self.offsets[band] + nearest[:, 0]
        return lists


def _ivf_lists(
    store: GradientStore, cfg: IndexConfig, sample: np.ndarray, width: int
) -> tuple[_NormBandedLists, faiss.IndexFlatIP]:
    """The IVF partition of `store` for maximum inner product, shared by ivfflat and ivfpq (`_build_ivfpq` says why).

    Returns the lists (k-means on `sample`) and the probing quantizer over D + `width` dimensions, rows
    [c, R, 0...]: an inner-product search with [q, |q|, 0...] ranks the lists by the bound <q, c> + |q| R.
    """
    dim, count = store.dim, store.num_documents
    nlist = cfg.nlist or max(1, int(4 * math.sqrt(count)))
    nlist = min(nlist, max(1, count // 39))  # faiss wants ≥ 39 training points per list
    lists = _NormBandedLists(sample, nlist, cfg.norm_bands, cfg.train_iterations)
    nlist = lists.nlist
    sums, counts = np.zeros((nlist, dim)), np.zeros(nlist)
    for shard in store.iter_shards():  # pass 1: list centres (members' means)
        x = np.asarray(shard.vectors, dtype=np.float32)
        if len(x):
            assigned = lists.assign(x)
            np.add.at(sums, assigned, x)
            counts += np.bincount(assigned, minlength=nlist)
    centres = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    radii = np.zeros(nlist)
    for shard in store.iter_shards():  # pass 2: list radii
        x = np.asarray(shard.vectors, dtype=np.float32)
        if len(x):
            assigned = lists.assign(x)
            np.maximum.at(radii, assigned, _norms(x - centres[assigned]))
    quantizer = faiss.IndexFlatIP(dim + width)
    quantizer.add(_augment(centres, radii * (1 + 1e-6), width))
    return lists, quantizer


def _fill_lists(
    ivf: faiss.IndexIVF, lists: _NormBandedLists, store: GradientStore, copy: faiss.Index | None = None
) -> None:
    """Pass 3: every stored vector as [x, 0...] (ivf.d columns) into its list, and into `copy` when given."""
    for shard in store.iter_shards():
        x = np.asarray(shard.vectors, dtype=np.float32)
        if len(x):
            # named: swig_ptr keeps no reference
            stored, assigned = _augment(x, None, ivf.d - x.shape[1]), lists.assign(x)
            ivf.add_core(len(stored), faiss.swig_ptr(stored), None, faiss.swig_ptr(assigned))
            if copy is not None:
                copy.add(stored)


def _build_ivfflat(store: GradientStore, cfg: IndexConfig) -> tuple[faiss.Index, dict[str, object]]:
    """IVF-Flat for maximum inner product: the norm-banded lists and bound of `_ivf_lists`, float32 vectors.

    `IndexIVFFlat(METRIC_INNER_PRODUCT)` over D + 1 dimensions: stored rows [x, 0], queries [q, |q|] (`search_index`
    appends the norm), so the quantizer ranks lists by <q, c> + |q| R and the scores are exactly <q, x>. No PQ, no
    refinement: the only approximation is the lists left unprobed; memory is the flat index's plus one column and
    the ids (8 B per vector).
    """
    lists, quantizer = _ivf_lists(store, cfg, _training_sample(store, cfg.train_size), 1)
    index = faiss.IndexIVFFlat(quantizer, store.dim + 1, lists.nlist, faiss.METRIC_INNER_PRODUCT)
    _fill_lists(index, lists, store)
    return index, {"nlist": lists.nlist, "norm_bands": len(lists.directions)}


def _build_ivfpq(store: GradientStore, cfg: IndexConfig) -> tuple[faiss.Index, dict[str, object]]:
    """IVF-PQ for maximum inner product: norm-banded lists probed by an upper bound, exact refinement.

    Why not `IndexIVFPQ(..., METRIC_INNER_PRODUCT)` with its k-means quantizer: projected (preconditioned) gradients
    are nearly isotropic in direction (a document's nearest neighbour has a cosine of ~0.2, a query's best document
    ~0.05) and their norms spread over two orders of magnitude, so the best inner products come mostly from the
    largest-norm documents. A direction-only quantizer ranks lists by <q, c> and misses them (recall@10 0.41 on the
    demo store at nprobe 16), and the MIPS-to-L2 reduction (append sqrt(M^2 - |x|^2)) collapses L2 k-means into one
    giant list on such data. Here instead (`_ivf_lists`, shared with ivfflat):

    - lists: `index.norm_bands` bands of equal count by norm, each split by spherical k-means of the directions;
    - probing: lists in decreasing order of the Cauchy-Schwarz bound <q, c> + |q| R on their best inner product
      (c the members' mean, R their largest distance to c), so narrow-norm lists of large vectors go first. faiss
      does this with an inner-product quantizer over rows [c, R, 0...] and queries [q, |q|, 0...];
    - PQ codes the vectors themselves (not residuals) with the stored rows [x, 0...]: the extra sub-vector is zero,
      so the PQ scores and the exact refinement (`IndexRefine` over a flat inner-product copy) are <q, x> exactly,
      whatever |q| is appended. `search_index` appends it; the index's dimension is D + D / pq_m.
    """
    dim = store.dim
    m = _pq_m(cfg, dim)
    width = dim // m  # one more PQ sub-vector: the |q| / R coordinate, zero for stored vectors
    sample = _training_sample(store, cfg.train_size)
    if len(sample) < 2 ** cfg.pq_bits:
        raise DastraError(
            f"IVF-PQ needs at least {2 ** cfg.pq_bits} training vectors (index.pq_bits = {cfg.pq_bits}), "
            f"the store has {len(sample)}: use index.kind: flat"
        )
    lists, quantizer = _ivf_lists(store, cfg, sample, width)
    nlist = lists.nlist
    ivfpq = faiss.IndexIVFPQ(quantizer, dim + width, nlist, m + 1, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
    ivfpq.by_residual = False
    ivfpq.cp.niter = cfg.train_iterations
    ivfpq.train(_augment(sample, None, width))  # the quantizer is complete: this trains the PQ codebooks only
    refine = faiss.IndexFlatIP(dim + width)
    _fill_lists(ivfpq, lists, store, refine)  # codes into their lists, exact copies for the refinement
    index = faiss.IndexRefine(ivfpq, refine)
    index.k_factor = float(cfg.refine_factor)
    info = {"nlist": nlist, "pq_m": m, "pq_bits": cfg.pq_bits, "norm_bands": len(lists.directions)}
    return index, info


def nprobe_for(cfg: IndexConfig, nlist: int, calibrated: int = 1) -> int:
    """index.nprobe, else max(`calibrated`, index.min_nprobe, ceil(index.probe_fraction x nlist)), at most all."""
    floor = max(calibrated, cfg.min_nprobe, math.ceil(cfg.probe_fraction * nlist))
    wanted = cfg.nprobe if cfg.nprobe is not None else floor
    return max(1, min(wanted, nlist))


def sample_positions(count: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct positions of [0, count) drawn uniformly (sorted), all of them when size >= count."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def gather_vectors(store: GradientStore, positions: np.ndarray) -> np.ndarray:
    """The stored vectors at sorted `positions` (shard order), float32 [len(positions), D]."""
    parts, start = [], 0
    for shard in store.iter_shards():
        end = start + len(shard.vectors)
        inside = positions[(positions >= start) & (positions < end)] - start
        parts.append(np.asarray(shard.vectors[inside], dtype=np.float32))
        start = end
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)


def exact_store_topk(store: GradientStore, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] positions of the k largest <q, x> over every stored vector (float32 products, streamed by shard)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best = np.zeros((len(queries), 0), dtype=np.int64)
    start = 0
    for shard in store.iter_shards():
        scores = queries @ np.asarray(shard.vectors, dtype=np.float32).T
        both_scores = np.concatenate([best_scores, scores], axis=1)
        both = np.concatenate([best, np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)], axis=1)
        keep = np.argsort(-both_scores, axis=1, kind="stable")[:, :k]
        best_scores, best = np.take_along_axis(both_scores, keep, 1), np.take_along_axis(both, keep, 1)
        start += scores.shape[1]
    return best


def _without_self(positions: np.ndarray, own: np.ndarray, k: int) -> list[set[int]]:
    return [set([int(p) for p in row if p >= 0 and p != me][:k]) for row, me in zip(positions, own)]


def calibration_target(target_recall: float) -> float:
    """The calibration queries' recall that gives real queries `target_recall` (CALIBRATION_MISS_RATIO)."""
    return 1 - (1 - target_recall) / CALIBRATION_MISS_RATIO


def calibrate_nprobe(index: faiss.Index, store: GradientStore, target: float,
                     calibration: tuple[np.ndarray, np.ndarray] | None = None, k: int = CALIBRATION_K
                     ) -> dict[str, object]:
    """The fewest probed lists whose recall@k against the exact top-k reaches `target`, found by bisection.

    calibration: (store positions [S], query vectors [S, D]) of sampled documents, each searched leave-one-out (its
    own position removed from both the exact and the IVF top-k+1): index/calibration.py makes them EK-FAC-
    preconditioned like real queries; None: `CALIBRATION_QUERIES` stored vectors drawn at random (seed 0).
    recall(nprobe) = mean |IVF top-k ∩ exact top-k| / k, non-decreasing in nprobe for ivfflat (more lists, a
    superset of candidates); where even every list misses the target (ivfpq, capped by PQ) all lists are chosen
    and the recall reached is what is recorded.
    """
    if calibration is None:
        own = sample_positions(store.num_documents, CALIBRATION_QUERIES, seed=0)
        calibration = (own, gather_vectors(store, own))
    own, queries = calibration
    exact = _without_self(exact_store_topk(store, queries, k + 1), own, k)
    ivf = faiss.extract_index_ivf(index)
    measured: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in measured:
            ivf.nprobe = nprobe
            found = _without_self(search_index(index, queries, k + 1)[1], own, k)
            measured[nprobe] = float(np.mean([len(f & e) / max(1, len(e)) for f, e in zip(found, exact)]))
        return measured[nprobe]

    low, high = 1, ivf.nlist
    if recall(high) >= target:
        while low < high:  # invariant: recall(high) >= target
            middle = (low + high) // 2
            low, high = (low, middle) if recall(middle) >= target else (middle + 1, high)
    return {"calibrated_nprobe": high, "calibration": {
        "target_recall": target, "recall_at_k": recall(high), "k": k, "queries": len(own),
        "sweep": [{"nprobe": n, "recall": r} for n, r in sorted(measured.items())]}}


def build_index(store: GradientStore, cfg: IndexConfig, calibration: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[faiss.Index, dict[str, object]]:
    """The index over every stored vector (in shard order) and what was built (kind, format, nlist, pq_m...);
    an IVF kind's probing is calibrated on `calibration` (see `calibrate_nprobe`)."""
    dim, count = store.dim, store.num_documents
    if count == 0:
        raise DastraError("the gradient store holds no document: check data.corpus")
    kind = index_kind(cfg, count)
    info: dict[str, object] = {"kind": kind, "index_format": INDEX_FORMATS[kind], "num_documents": count, "dim": dim}
    if kind in ("ivfflat", "ivfpq"):
        index, built = (_build_ivfflat if kind == "ivfflat" else _build_ivfpq)(store, cfg)
        info.update(built)
        info.update(calibrate_nprobe(index, store, calibration_target(cfg.target_recall), calibration))
        info["nprobe"] = faiss.extract_index_ivf(index).nprobe = nprobe_for(cfg, built["nlist"], info["calibrated_nprobe"])
        return index, info
    index = faiss.IndexFlatIP(dim)
    for shard in store.iter_shards():
        if len(shard.vectors):
            index.add(np.asarray(shard.vectors, dtype=np.float32))
    return index, info


def save_index(index: faiss.Index, folder: Path) -> None:
    """`faiss.write_index` into folder/index.faiss. faiss reports a failed write (a full disk, a file-size limit, a
    read-only folder) as a RuntimeError "write error in FILE: ... (No space left on device)": it is raised as the
    OSError it is, naming the file, so the CLI says what to do instead of printing a traceback."""
    path = Path(folder) / INDEX_FILE
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:
        message = " ".join(str(exc).split())
        code = next((c for c in sorted(errno.errorcode) if f"({os.strerror(c)})" in message or
                     message.endswith(f": {os.strerror(c)}")), None)
        if code is not None:
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise DastraError(
            f"faiss could not write the index '{path}' ({message.rpartition('Error: ')[2]}): check the free space "
            "and permissions of output.run_dir, then re-run `dastra index`"
        ) from exc


def load_index(folder: Path, cfg: IndexConfig) -> faiss.Index:
    """Read the saved index, set the search parameters of `cfg` (nprobe, refine_factor), move it to the device.

    The probing is `nprobe_for` with the calibrated nprobe of folder/meta.json (1 when the index has none)."""
    index = faiss.read_index(str(Path(folder) / INDEX_FILE))
    meta_path = Path(folder) / "meta.json"
    calibrated = json.loads(meta_path.read_text()).get("calibrated_nprobe", 1) if meta_path.is_file() else 1
    base = index
    if isinstance(index, faiss.IndexRefine):  # ivfpq
        index.k_factor = float(cfg.refine_factor)
        base = index.base_index
    if not isinstance(index, faiss.IndexFlat):  # ivfflat, ivfpq
        ivf = faiss.extract_index_ivf(base)
        ivf.nprobe = nprobe_for(cfg, ivf.nlist, int(calibrated))
    return to_device(index, cfg.device)


def faiss_nprobe(index: faiss.Index) -> int | None:
    """The lists an IVF index probes (None for the exact flat index, CPU or GPU)."""
    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:  # not an IVF index
        return None


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], positions [Q, k]) of the k largest inner products <q, x>; position -1 where fewer exist.

    An IVF index of `build_index` has D + 1 (ivfflat) or D + D / pq_m (ivfpq) dimensions: the queries are searched
    as [q, |q|, 0...] (the norm feeds the lists' probing bound; stored vectors are zero there, so the scores stay
    <q, x>).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.d > queries.shape[1]:
        queries = _augment(queries, _norms(queries), index.d - queries.shape[1])
    return index.search(queries, min(k, index.ntotal))
