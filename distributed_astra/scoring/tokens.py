"""Per-token attribution: which tokens of a training document carry its influence on a query (seeds §1, Eq 2).

A document's score is a sum over its sequences, its tokens and the tracked modules (docs/design.md, "Scores"):

    τ(z_q, z_m) = Σ_t term_t,    term_t = Σ_modules Ds_tᵀ X_q ā_t

with X_q [out, in+1] the solved query direction (G + λI)⁻¹∇f of each module, ā_t the module input at position t
(bias column appended) and Ds_t the gradient of the document's summed loss with respect to the module output at t.
Ds_t carries the losses of every later position that attends to t, so term_t is the influence that flows through
position t's activations; the terms of a document add up to its score exactly.

Scoring keeps only one number per document; these terms are computed in a second pass over just the top-k
documents of each query, and only for the (query, document) pairs that need them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from distributed_astra.models.modules import TrackedModule
from distributed_astra.scoring.gradients import captured_batches


def pair_token_scores(
    output_grads: Mapping[str, torch.Tensor],
    activations: Mapping[str, torch.Tensor],
    directions: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """[P, T] term_t = Σ_modules Ds[rows[p], t]ᵀ X_{queries[p]} ā[rows[p], t] for P (sequence row, query) pairs.

    Ds [B, T, out] and ā [B, T, in+1] per module (zero at padding), directions [Q, out, in+1] per module. Pairs are
    grouped by query, so each direction is used in place (no [P, out, in+1] gather).
    """
    first = next(iter(output_grads.values()))
    terms = torch.zeros((len(rows), first.shape[1]), dtype=first.dtype)
    for query in torch.unique(queries).tolist():
        pairs = torch.nonzero(queries == query).flatten()
        selected = rows[pairs]
        for name, x in directions.items():
            ds, a = output_grads[name][selected], activations[name][selected]
            terms[pairs] += ((ds @ x[query]) * a).sum(dim=-1)
    return terms


@dataclass
class DocumentTokenScores:
    """A document's token ids (all its sequences in order, padding dropped) and its per-token terms for one query."""

    token_ids: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def terms(self) -> torch.Tensor:
        """[num_tokens] float64 per-token terms; they sum to the document's score."""
        return torch.cat(self.scores).to(torch.float64) if self.scores else torch.zeros(0, dtype=torch.float64)


def document_token_scores(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    directions: Mapping[str, torch.Tensor],
    wanted: Mapping[int, Sequence[int]],
    dtype: torch.dtype,
) -> dict[tuple[int, int], DocumentTokenScores]:
    """Per-token terms of every (query index, doc_id) pair with the query index in `wanted[doc_id]`.

    `batches` are training batches (as `scoring.gradients.captured_batches` takes them) in which every sequence of a
    wanted document appears, in document order; sequences of other documents are run but ignored, so pass batches
    of the wanted documents only. `directions` [Q, out, in+1] per module, in the compute dtype `dtype`.
    """
    result: dict[tuple[int, int], DocumentTokenScores] = {
        (query, doc_id): DocumentTokenScores() for doc_id, queries in wanted.items() for query in queries
    }
    for batch, capture in captured_batches(model, tracked, batches, dtype):
        rows, queries = [], []
        for row, doc_id in enumerate(batch["doc_id"].tolist()):
            for query in wanted.get(doc_id, ()):
                rows.append(row)
                queries.append(query)
        if not rows:
            continue
        terms = pair_token_scores(
            capture.output_grads, capture.activations, directions, torch.tensor(rows), torch.tensor(queries)
        )
        real = batch["attention_mask"].bool()
        for pair, (row, query) in enumerate(zip(rows, queries)):
            entry = result[(query, int(batch["doc_id"][row]))]
            entry.token_ids.extend(batch["input_ids"][row][real[row]].tolist())
            entry.scores.append(terms[pair][real[row]])
    return result
