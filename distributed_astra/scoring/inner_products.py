"""Inner products between per-sequence training gradients and Q solved query directions (seeds §1, Eq 2).

For a module with per-token inputs ā_t [I] and output gradients Ds_t [O], the sequence gradient is Σ_t Ds_t ā_tᵀ and
its inner product with a direction X_q [O, I] is Σ_t Ds_tᵀ X_q ā_t. Two ways to compute it for a batch of B
sequences of T tokens:
  - materialise the per-sequence gradients: B·T·O·I + B·Q·O·I multiply-adds, B·O·I memory;
  - stay per token (X_q ā_t first): Q·B·T·O·I multiply-adds, B·Q·T·O memory, no O×I per sequence.
`sequence_scores` picks the cheaper one per module; both give the same numbers. A module's directions may also be
held as rank-r factors (`scoring.low_rank.LowRank`, `scoring.direction_rank`), scored without forming X_q.
"""

from __future__ import annotations

import torch

from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.scoring.low_rank import LowRank

Direction = torch.Tensor | LowRank  # one module's directions of Q queries: [Q, O, I], or its rank-r factors
CAST_BLOCK_ELEMENTS = 1 << 28  # directions stored in another dtype are cast at most this many numbers at a time


def materialise_per_sequence(batch: int, tokens: int, out_dim: int, in_dim: int, num_queries: int) -> bool:
    """Whether forming the B per-sequence gradients (B·O·I·(T+Q) multiply-adds) is cheaper than the per-token
    form (Q·B·T·O·I) for Q directions of an [O, I] module: the one rule of `module_scores` and its transpose
    (`ihvp.products.weighted_gradient_sum`)."""
    return batch * out_dim * in_dim * (tokens + num_queries) <= num_queries * batch * tokens * out_dim * in_dim


def module_scores(ds: torch.Tensor, a: torch.Tensor, directions: Direction) -> torch.Tensor:
    """[B, Q] scores of one module from Ds [B,T,O], ā [B,T,I] and its directions ([Q,O,I] in any storage dtype,
    used in Ds's dtype; or `LowRank` factors)."""
    if isinstance(directions, LowRank):
        return directions.scores(ds, a)
    batch, tokens, out_dim = ds.shape
    num_queries, _, in_dim = directions.shape
    materialise = materialise_per_sequence(batch, tokens, out_dim, in_dim, num_queries)
    # the per-sequence gradients [B, O·I], once for every query
    grads = sequence_gradients(ds, a).reshape(batch, -1) if materialise else None
    # directions stored in another dtype (bfloat16) are cast a block of queries at a time: a copy no larger than
    # B sequence gradients or CAST_BLOCK_ELEMENTS numbers
    block = num_queries if directions.dtype == ds.dtype else max(batch, CAST_BLOCK_ELEMENTS // (out_dim * in_dim))
    parts = []
    for start in range(0, num_queries, block):
        x = directions[start : start + block].to(ds.dtype)
        if grads is not None:  # one [B, O·I] @ [O·I, q] matmul: torch's einsum of it can be several times slower
            parts.append(grads @ x.reshape(len(x), -1).T)
        else:
            parts.append(torch.einsum("bto,bqto->bq", ds, torch.einsum("qoi,bti->bqto", x, a)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def sequence_scores(
    output_grads: dict[str, torch.Tensor], activations: dict[str, torch.Tensor], directions: dict[str, Direction]
) -> torch.Tensor:
    """[B, Q] = Σ_modules Σ_t Ds_tᵀ X_q ā_t for every sequence of a captured batch."""
    return sum(module_scores(output_grads[name], activations[name], directions[name]) for name in directions)
