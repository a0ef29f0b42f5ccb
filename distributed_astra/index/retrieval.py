r"""How much of the exhaustive exact top-k a two-stage search kept, estimated from an exact re-score of a sample.

A search returns, per query q, the k best exact scores s_q1 ≥ ... ≥ s_qk of its shortlist S_q (the index's top
k·r). What it misses are the outsiders (documents not in S_q) whose exact score would enter the top-k: returned
item i (0-based rank) stays in the exhaustive top-k iff i + M_q(s_qi) < k, where M_q(s) is the number of
outsiders scoring above s. Alongside the shortlists, `search` re-scores exactly a uniform random sample U of the
stored documents (`recall_sample_size`, shared by all queries, fixed seed) and estimates

    M_q(s) ≈ (N - |S_q|) · F̂((s - m_q) / d_q)                                          (1)
    recall_q ≈ (1/k) Σ_i clip(k - i - M_q(s_qi), 0, 1)                                  (2)

with m_q, d_q the median and median absolute deviation of query q's sampled outsider scores U \ S_q, and F̂ the
pooled tail: the fraction of all queries' standardised sampled outsider scores above a value. Why pooled: the top-k
of N documents lies in the tail at 1 - k/N, which one query's sample of |U| ≪ N/k documents does not reach (a
per-query estimate is then optimistic, reading an unsampled tail as empty), while Q queries together hold Q |U|
standardised scores. The assumption is that the queries' outsider scores share one tail shape after that
standardisation. When U holds every outsider of q (small stores), M_q is counted instead and (2) is the true
recall. (2) is the indicator i + M < k with the count read as continuous, so an item on the boundary
counts in part. The reported `recall_estimate` is the mean of (2) over queries; its standard error is the spread
of that mean over bootstrap resamples of U (`BOOTSTRAP` resamples). On a store of 4,000 synthetic gradients with
40 queries, the mean estimate is within 0.06 of the true recall (0.32-0.90) sampling 2.5% of the store, within
0.04 sampling 10% (tests/test_retrieval.py holds one such store to ±0.1). On the demo store (4,040 documents, 80
EK-FAC queries, true recall 0.46), over 6 sample seeds: 0.545 ± 0.10 with 100 sampled documents, 0.466 ± 0.06
with 200, 0.461 ± 0.015 with 400, hence index.recall_sample_min = 200. The pooled tail reaches the top-k when
Q |U| ≫ N / k. The bootstrap standard error understates the spread over sample seeds for small samples (0.045
against 0.10 at 100 documents).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RECALL_SAMPLE_SEED = 0
BOOTSTRAP = 50


def recall_sample_size(num_documents: int, fraction: float, minimum: int) -> int:
    """max(minimum, ceil(fraction x N)) documents, at most N."""
    return min(num_documents, max(minimum, math.ceil(fraction * num_documents)))


def _standardise(scores: np.ndarray) -> tuple[float, float]:
    """(median, median absolute deviation) of `scores`, the deviation falling back to the std, then 1."""
    centre = float(np.median(scores))
    spread = float(np.median(np.abs(scores - centre)))
    return centre, spread if spread > 0 else (float(scores.std()) or 1.0)


def estimate_recalls(
    returned: Sequence[np.ndarray], outsiders: Sequence[np.ndarray], num_outside: Sequence[int], k: int
) -> np.ndarray:
    """[Q] recall estimates (2) of the module docstring; NaN for a query with outsiders but none sampled.

    returned[q]: the exact scores of query q's results (at most k); outsiders[q]: the exact scores of the sampled
    documents outside its shortlist; num_outside[q]: N - |S_q| (0: the shortlist is the whole store, recall 1).
    """
    stats = [_standardise(o) if len(o) else (0.0, 1.0) for o in outsiders]
    pooled = np.sort(np.concatenate([(o - c) / d for o, (c, d) in zip(outsiders, stats)] + [np.zeros(0)]))
    recalls = np.full(len(returned), np.nan)
    for q, (scores, (centre, spread), outside) in enumerate(zip(returned, stats, num_outside)):
        if outside == 0:
            recalls[q] = 1.0
        elif len(outsiders[q]):
            ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
            if len(outsiders[q]) == outside:  # every outsider sampled: M_q is counted, the estimate is exact
                own = np.sort(outsiders[q])
                beating = len(own) - np.searchsorted(own, ordered, side="right")
            else:
                above = len(pooled) - np.searchsorted(pooled, (ordered - centre) / spread, side="right")
                beating = outside * above / len(pooled)  # (1)
            recalls[q] = float(np.clip(k - np.arange(len(ordered)) - beating, 0.0, 1.0).sum() / k)
    return recalls


def recall_estimate(
    query_ids: Sequence[object],
    shortlists: Sequence[set[int]],
    results: Sequence[Sequence[int]],
    exact: Mapping[int, np.ndarray],
    sample: Sequence[int],
    num_documents: int,
    k: int,
) -> dict[str, object]:
    """The recall estimate of a search, for search/meta.json.

    shortlists[q]: the rows of query q's shortlist; results[q]: the rows it returned; exact: row -> [Q] exact scores
    (every shortlist and sample row); sample: the sampled rows (U).
    """
    sample = np.asarray(sample, dtype=np.int64)
    sample_scores = np.array([exact[int(row)] for row in sample], dtype=np.float64).reshape(len(sample), -1)
    returned = [np.array([exact[row][q] for row in result], dtype=np.float64) for q, result in enumerate(results)]
    outside_counts = [num_documents - len(shortlist) for shortlist in shortlists]
    masks = [np.array([int(row) not in shortlist for row in sample], dtype=bool) for shortlist in shortlists]

    def estimate(rows: np.ndarray) -> np.ndarray:
        outsiders = [sample_scores[rows[mask[rows]], q] for q, mask in enumerate(masks)]
        return estimate_recalls(returned, outsiders, outside_counts, k)

    values = estimate(np.arange(len(sample)))
    known = values[np.isfinite(values)]
    mean = float(known.mean()) if len(known) else None  # None: JSON null, no estimate
    stderr = 0.0 if len(sample) == num_documents else None  # the whole store sampled: nothing is estimated
    if stderr is None and len(sample) and len(known):
        rng = np.random.default_rng(RECALL_SAMPLE_SEED)
        resampled = [np.nanmean(estimate(rng.integers(0, len(sample), len(sample)))) for _ in range(BOOTSTRAP)]
        stderr = float(np.nanstd(resampled))
    return {
        "recall_estimate": mean,
        "recall_estimate_stderr": stderr,
        "recall_sample_documents": len(sample),
        "recall_method": "exact re-score of a uniform random sample, pooled standardised tail (index/retrieval.py)",
        "recall_per_query": {str(qid): float(v) if np.isfinite(v) else None for qid, v in zip(query_ids, values)},
    }
