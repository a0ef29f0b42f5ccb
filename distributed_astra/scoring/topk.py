"""Streaming top-k per query over documents whose sequences arrive contiguously, never an N×Q matrix."""

from __future__ import annotations

import torch


class StreamingTopK:
    """Keeps the k largest document scores per query.

    Sequences of one document arrive one after another (possibly across batches); their scores are summed into the
    document's score, which enters the top-k once the next document starts (or at `finish`).
    """

    def __init__(self, num_queries: int, k: int, keep_all: bool = False, dtype: torch.dtype = torch.float64) -> None:
        self.k = k
        self._all: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep_all else None
        self.scores = torch.full((num_queries, 0), float("-inf"), dtype=dtype)
        self.doc_ids = torch.zeros((num_queries, 0), dtype=torch.long)
        self._pending_id: int | None = None
        self._pending_score = torch.zeros(num_queries, dtype=dtype)
        self.num_documents = 0

    def _push(self, doc_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Merge finished documents: doc_ids [n], scores [n, Q]."""
        if len(doc_ids) == 0:
            return
        self.num_documents += len(doc_ids)
        if self._all is not None:
            self._all.append((doc_ids.clone(), scores.clone()))
        merged_scores = torch.cat([self.scores, scores.t().to(self.scores.dtype)], dim=1)
        merged_ids = torch.cat([self.doc_ids, doc_ids[None, :].expand(self.scores.shape[0], -1)], dim=1)
        keep = min(self.k, merged_scores.shape[1])
        self.scores, index = torch.topk(merged_scores, keep, dim=1)
        self.doc_ids = torch.gather(merged_ids, 1, index)

    def update(self, doc_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Add a batch of sequence scores [B, Q] with their document ids [B] (documents contiguous in the stream)."""
        unique, counts = torch.unique_consecutive(doc_ids, return_counts=True)
        summed = torch.zeros((len(unique), scores.shape[1]), dtype=self._pending_score.dtype)
        summed.index_add_(0, torch.repeat_interleave(torch.arange(len(unique)), counts), scores.to(summed.dtype))
        if self._pending_id is not None:
            if unique[0].item() == self._pending_id:
                summed[0] += self._pending_score
            else:
                self._push(torch.tensor([self._pending_id]), self._pending_score[None, :])
        self._push(unique[:-1], summed[:-1])
        self._pending_id, self._pending_score = int(unique[-1]), summed[-1].clone()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k], doc_ids [Q, k]), best first."""
        if self._pending_id is not None:
            self._push(torch.tensor([self._pending_id]), self._pending_score[None, :])
            self._pending_id = None
        return self.scores, self.doc_ids

    def all_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc_ids [N], scores [N, Q]) of every document: only with `keep_all=True` (`scoring.dense: true`)."""
        if self._all is None:
            raise ValueError("StreamingTopK was built without keep_all=True")
        return torch.cat([ids for ids, _ in self._all]), torch.cat([s for _, s in self._all])
