"""Eigenbases of A and S, and pass 2 of the EK-FAC fit: the eigenvalue correction Λ (seeds §3, Eq 28).

    A = Q_A diag(d_A) Q_Aᵀ,   S = Q_S diag(d_S) Q_Sᵀ                    (eigh of 0.5(C + Cᵀ), ascending)
    Λ[b, a] = (1/N_seq) Σ_n (q_S,bᵀ DW̄_n q_A,a)²                        (per-SEQUENCE gradients, sampled targets)

DW̄_n = Σ_t Ds_t ā_tᵀ is the gradient of sequence n's summed loss, so Λ has the scale of the GGN of the mean over
sequences (kronfluence's convention; docs/design.md, "Loss scale"); for a `task.Task` other than the causal LM a
"sequence" is one example of the task (`Task.num_examples`). It is computed from the rotated factors
(Ds Q_S)ᵀ(ā Q_A) and never forms an [out*(in+1)]² matrix.

`eigendecompose_module` works on one module so that the eigendecompositions can be sharded by module; `LambdaStats`
is a sum plus a count, mergeable with `+`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from distributed_astra.curvature.covariance import (
    CovarianceStats,
    OnBatch,
    Route,
    batch_to_device,
    local_route,
    model_device,
    product_dtype,
    sampled_fisher_capture,
)
from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule
from distributed_astra.task import CAUSAL_LM, Task

# Largest number of elements of the rotated per-sequence gradient block materialised at once in pass 2.
_CHUNK_ELEMENTS = 1 << 25


@dataclass
class KroneckerEigen:
    """Eigen-decompositions of one module's A ([in+1]²) and S ([out]²); eigenvectors are the columns of q_*."""

    eigval_a: torch.Tensor  # [in+1], ascending
    q_a: torch.Tensor  # [in+1, in+1]
    eigval_s: torch.Tensor  # [out], ascending
    q_s: torch.Tensor  # [out, out]

    def to(self, device: torch.device | str) -> KroneckerEigen:
        return KroneckerEigen(*(t.to(device) for t in (self.eigval_a, self.q_a, self.eigval_s, self.q_s)))


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` of 0.5(C + Cᵀ) in C's dtype: (ascending eigenvalues, orthonormal eigenvector columns)."""
    sym = 0.5 * (matrix + matrix.T)
    if not bool(torch.isfinite(sym).all()):
        raise DastraError("non-finite covariance statistics: a NaN/Inf slipped into the factor pass")
    return torch.linalg.eigh(sym)


def eigendecompose_module(a_cov: torch.Tensor, s_cov: torch.Tensor) -> KroneckerEigen:
    """Eigenbases of one module's normalised covariances A and S, in their dtype (float64 by default)."""
    eigval_a, q_a = symmetric_eigh(a_cov)
    eigval_s, q_s = symmetric_eigh(s_cov)
    return KroneckerEigen(eigval_a, q_a, eigval_s, q_s)


def eigendecompose(stats: CovarianceStats, names: Iterable[str] | None = None) -> dict[str, KroneckerEigen]:
    """Per-module eigendecompositions of A = a_sum/num_tokens and S = s_sum/num_tokens (all modules by default)."""
    names = list(stats.a_sum) if names is None else list(names)
    return {n: eigendecompose_module(stats.covariance_a(n), stats.covariance_s(n)) for n in names}


def rotated_squared_gradients(ds: torch.Tensor, abar: torch.Tensor, eigen: KroneckerEigen) -> torch.Tensor:
    """Σ_n (Q_Sᵀ DW̄_n Q_A)² over the sequences of one batch: [out, in+1].

    ds [B, T, out] and abar [B, T, in+1] in the statistics dtype; DW̄_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ.
    """
    ds_rot = ds @ eigen.q_s.to(device=ds.device, dtype=ds.dtype)  # rows are (Q_Sᵀ Ds_t)ᵀ
    a_rot = abar @ eigen.q_a.to(device=abar.device, dtype=abar.dtype)  # rows are (Q_Aᵀ ā_t)ᵀ
    out_dim, in_dim = ds_rot.shape[-1], a_rot.shape[-1]
    total = torch.zeros(out_dim, in_dim, dtype=ds.dtype, device=ds.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, out_dim * in_dim))
    for start in range(0, ds_rot.shape[0], chunk):
        g = sequence_gradients(ds_rot[start : start + chunk], a_rot[start : start + chunk])
        total += (g * g).sum(dim=0)
    return total


@dataclass
class LambdaStats:
    """Σ_n (Q_Sᵀ DW̄_n Q_A)² per module ([out, in+1]) over `num_sequences` sequences."""

    lambda_sum: dict[str, torch.Tensor]
    num_sequences: int

    @classmethod
    def zeros(
        cls, tracked: dict[str, TrackedModule], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> LambdaStats:
        return cls({n: torch.zeros(*t.shape, dtype=dtype, device=device) for n, t in tracked.items()}, 0)

    def __add__(self, other: LambdaStats) -> LambdaStats:
        if set(self.lambda_sum) != set(other.lambda_sum):
            raise DastraError(
                "cannot merge eigenvalue corrections over different modules: "
                f"{sorted(set(self.lambda_sum) ^ set(other.lambda_sum))}"
            )
        return LambdaStats(
            {n: v + other.lambda_sum[n].to(v.device) for n, v in self.lambda_sum.items()},
            self.num_sequences + other.num_sequences,
        )

    def corrected_eigenvalues(self, name: str) -> torch.Tensor:
        """Λ = lambda_sum / num_sequences ([out, in+1])."""
        if self.num_sequences <= 0:
            raise DastraError("the eigenvalue-correction pass saw no sequence carrying a loss: the corpus is empty")
        return self.lambda_sum[name] / self.num_sequences

    def to(self, device: torch.device | str) -> LambdaStats:
        return LambdaStats({n: t.to(device) for n, t in self.lambda_sum.items()}, self.num_sequences)


def collect_eigenvalue_correction(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    eigens: dict[str, KroneckerEigen],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    on_batch: OnBatch | None = None,
    *,
    task: Task = CAUSAL_LM,
    route: Route = local_route,
) -> LambdaStats:
    """Accumulate Σ_n (Q_Sᵀ DW̄_n Q_A)² with freshly sampled targets (`task.sampled_loss`). `on_batch(rows)` after
    each batch; `num_sequences` counts `task.num_examples`.

    Every module of `tracked` is hooked and routed (`covariance.Route`, ā and Ds as [B, T, ·]); Λ is accumulated
    for the modules of `eigens` (the ones this rank owns; all of `tracked` in one process) from the pieces `route`
    hands this rank.
    """
    unknown = [n for n in eigens if n not in tracked]
    if unknown:
        raise DastraError(f"eigendecompositions of untracked module(s) {unknown}: fit the factors of this model")
    device = model_device(model)
    eigens = {n: e.to(device) for n, e in eigens.items()}
    stats = LambdaStats.zeros({n: tracked[n] for n in eigens}, dtype, device)
    compute = product_dtype(model, dtype)
    for batch in batches:
        batch = batch_to_device(batch, device)
        capture, _ = sampled_fisher_capture(model, tracked, batch, compute, generator, task=task)
        for name in tracked:
            pieces = route(name, [capture.output_grad(name), capture.activation(name)])
            for ds, abar in pieces if name in eigens else ():
                stats.lambda_sum[name] += rotated_squared_gradients(ds, abar, eigens[name]).to(dtype)
        stats.num_sequences += task.num_examples(batch)
        del capture
        if on_batch is not None:
            on_batch(task.num_rows(batch))
    return stats
