"""Per-module low-rank query directions (`scoring.direction_rank`; kronfluence's `query_gradient_low_rank` idea,
applied to the solved directions).

Each query's direction of a module, X_q [O, I] (I = in+1, bias last), is replaced by its rank-r truncated SVD
X_q ≈ U_q diag(s) V_qᵀ with s folded into U (U_q [O, r], V_q [I, r]). For a sequence with per-token output gradients
Ds_t [O] and inputs ā_t [I] the score is

    τ = Σ_t Ds_tᵀ X_q ā_t = Σ_t Σ_k (Ds_tᵀ u_k)(v_kᵀ ā_t),

so two per-token projections (Ds U, ā V) and an elementwise product replace X: B·T·Q·r·(O+I) multiply-adds and
Q·r·(O+I) stored numbers per module instead of B·O·I·(T+Q) (or Q·B·T·O·I) and Q·O·I. At r = min(O, I) it is exact
(Eckart-Young: the truncation error in Frobenius norm is the norm of the dropped singular values).

U and V may be stored in bfloat16 (`scoring.direction_dtype`); the products run in the dtype of the captured Ds/ā
(float32, or float64 for the reference tests), so only the storage is rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_astra.config import ScoringConfig


@dataclass(frozen=True)
class LowRank:
    """One module's directions of Q queries as rank-r factors: U [Q, out, r] (singular values folded in) and
    V [Q, in+1, r], X_q = U_q V_qᵀ."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.v.numel() * self.v.element_size()

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The directions U Vᵀ [Q, out, in+1] (for checks; scoring never forms them)."""
        return torch.einsum("qor,qir->qoi", self.u.to(dtype), self.v.to(dtype))

    def scores(self, ds: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """[B, Q] = Σ_t Σ_k (Ds_tᵀ u_qk)(v_qkᵀ ā_t) from Ds [B,T,O] and ā [B,T,I], in Ds's dtype: two matmuls over
        all queries at once, [B·T, O] @ [O, Q·r] and [B·T, I] @ [I, Q·r]."""
        batch, tokens, out_dim = ds.shape
        num_queries, _, r = self.u.shape
        pu = ds.reshape(batch * tokens, out_dim) @ self.u.to(ds.dtype).permute(1, 0, 2).reshape(out_dim, -1)
        pv = a.reshape(batch * tokens, -1).to(ds.dtype) @ self.v.to(ds.dtype).permute(1, 0, 2).reshape(-1, pu.shape[1])
        return (pu * pv).view(batch, tokens, num_queries, r).sum(dim=(1, 3))


def kept_rank(rank: int, out_dim: int, in_dim: int) -> int:
    """The rank kept of an [out, in+1] direction: `rank`, or the module's full rank when that is smaller."""
    return min(rank, out_dim, in_dim)


def low_rank(x: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> LowRank:
    """The rank-`rank` truncated SVD of every query's direction of one module (x [Q, out, in+1]), computed in
    float64 on x's device one query at a time (a float64 copy of one [out, in+1] block at most) and stored in
    `dtype`; a module with min(out, in+1) ≤ `rank` keeps its full rank (exact)."""
    num_queries, out_dim, in_dim = x.shape
    r = kept_rank(rank, out_dim, in_dim)
    u = x.new_empty(num_queries, out_dim, r, dtype=dtype)
    v = x.new_empty(num_queries, in_dim, r, dtype=dtype)
    for q in range(num_queries):
        left, s, right = torch.linalg.svd(x[q].to(torch.float64), full_matrices=False)
        u[q] = left[:, :r] * s[:r]
        v[q] = right[:r].T
    return LowRank(u, v)


def storage_dtype(scoring: ScoringConfig, compute: torch.dtype) -> torch.dtype:
    """The dtype scoring stores directions in: bfloat16 under `scoring.direction_dtype: bfloat16`, else the
    products' dtype `compute` (float32; float64 for a float64 model and statistics)."""
    return torch.bfloat16 if scoring.direction_dtype == "bfloat16" else compute


def stored_direction(x: torch.Tensor, scoring: ScoringConfig, compute: torch.dtype) -> torch.Tensor | LowRank:
    """One module's directions x [Q, out, in+1] as scoring holds them: rank `scoring.direction_rank` factors
    (`low_rank`) or whole, in `storage_dtype`. The report's per-token terms use the same rule, so they add up to
    the scores; `stored_like` is its shape for the planner."""
    store = storage_dtype(scoring, compute)
    return low_rank(x, scoring.direction_rank, store) if scoring.direction_rank else x.to(store)


def stored_like(num_queries: int, shape: tuple[int, int], scoring: ScoringConfig, compute: torch.dtype,
                device: torch.device | str) -> torch.Tensor | LowRank:
    """Uninitialised directions of `num_queries` queries of an [out, in+1] module in `stored_direction`'s form
    (the planner's meta-device replay: no SVD)."""
    store = storage_dtype(scoring, compute)
    if not scoring.direction_rank:
        return torch.empty(num_queries, *shape, dtype=store, device=device)
    r = kept_rank(scoring.direction_rank, *shape)
    return LowRank(torch.empty(num_queries, shape[0], r, dtype=store, device=device),
                   torch.empty(num_queries, shape[1], r, dtype=store, device=device))
