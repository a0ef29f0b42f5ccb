"""EK-FAC averaged over a segment's checkpoints, and the segment's averaged parameters (seeds §6.3, §7).

Two ways to get Ḡ_ℓ ≈ (Q_Ā ⊗ Q_S̄) diag(Λ̄) (Q_Ā ⊗ Q_S̄)ᵀ:

- `fit_segment_ekfac` is SOURCE's recipe (App. D.2): A_c, S_c at every checkpoint, Ā and S̄ their means, the common
  basis from eigh(Ā), eigh(S̄), then Λ_c of every checkpoint measured in that common basis (a second data pass per
  checkpoint) and averaged. It reuses the fit's passes (`collect_covariances`, `collect_eigenvalue_correction`),
  whose sums add across checkpoints exactly as they add across data shards.
- `average_ekfac` needs no data: it averages already fitted per-checkpoint factors. Ā and S̄ are rebuilt from each
  checkpoint's eigendecompositions, and Λ̄ is the diagonal of mean_c G_EKFAC,c in the common basis,

      Λ̄ = mean_c (R_S,c ∘ R_S,c) Λ_c (R_A,c ∘ R_A,c)ᵀ,   R_S,c = Q_S̄ᵀ Q_S,c,  R_A,c = Q_Āᵀ Q_A,c,

  the best diagonal (in Frobenius norm) for the averaged EK-FAC matrices in that basis. It equals the recipe above
  when the checkpoints share their bases, and differs from it only by using G_EKFAC,c instead of the per-sequence
  gradients of checkpoint c when they do not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from distributed_astra.curvature.covariance import collect_covariances, model_device
from distributed_astra.curvature.eigen import collect_eigenvalue_correction, eigendecompose, symmetric_eigh
from distributed_astra.curvature.factors import EkfacFactors, ModuleFactors, build_factors
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule


def _check_same_modules(factors: Sequence[EkfacFactors]) -> None:
    if not factors:
        raise DastraError("cannot average EK-FAC factors over zero checkpoints")
    first = {n: m.shape for n, m in factors[0].modules.items()}
    for i, f in enumerate(factors[1:], start=1):
        if {n: m.shape for n, m in f.modules.items()} != first:
            raise DastraError(f"checkpoint {i}'s factors track other modules or shapes than checkpoint 0's")


def average_ekfac(factors: Sequence[EkfacFactors]) -> EkfacFactors:
    """The segment-averaged EK-FAC from per-checkpoint factors (module docstring), in the first factors' dtype."""
    _check_same_modules(factors)
    dtype, device = factors[0].dtype, factors[0].device
    count = len(factors)
    modules = {}
    for name in factors[0].names:
        parts = [f[name].to(device, dtype) for f in factors]
        a_mean = sum(p.q_a @ torch.diag(p.eigval_a) @ p.q_a.T for p in parts) / count
        s_mean = sum(p.q_s @ torch.diag(p.eigval_s) @ p.q_s.T for p in parts) / count
        eigval_a, q_a = symmetric_eigh(a_mean)
        eigval_s, q_s = symmetric_eigh(s_mean)
        lam = sum((q_s.T @ p.q_s).square() @ p.lambda_ @ (q_a.T @ p.q_a).square().T for p in parts) / count
        modules[name] = ModuleFactors(q_a, eigval_a, q_s, eigval_s, lam)
    return EkfacFactors(
        modules,
        sum(f.num_tokens for f in factors),
        sum(f.num_sequences for f in factors),
        sum(f.num_lambda_sequences for f in factors),
    )


def fit_segment_ekfac(
    checkpoints: Callable[[], Iterable[tuple[nn.Module, dict[str, TrackedModule]]]],
    make_batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> EkfacFactors:
    """SOURCE's averaged EK-FAC over the checkpoints of one segment (App. D.2, seeds §6.3).

    `checkpoints()` yields (model, tracked modules) at each checkpoint of the segment, in the same order on each of
    its two calls: a list's iterator, or a generator that loads each checkpoint's weights into one model in turn
    (stages/source.py). `make_batches()` must yield the same data on every call (it is called twice per
    checkpoint). Sums over checkpoints divided by the total counts are the means over checkpoints because every
    checkpoint sees the same data.
    """
    generator, names, cov = None, None, None
    for i, (model, tracked) in enumerate(checkpoints()):
        if names is None:
            names = list(tracked)
            generator = torch.Generator(device=model_device(model)).manual_seed(seed)
        elif list(tracked) != names:
            raise DastraError(f"checkpoint {i} tracks modules {list(tracked)}, checkpoint 0 tracks {names}")
        stats = collect_covariances(model, tracked, make_batches(), dtype, generator)
        cov = stats if cov is None else cov + stats
    if cov is None:
        raise DastraError("cannot fit a segment's EK-FAC over zero checkpoints")
    eigens = eigendecompose(cov)
    lam = None
    for model, tracked in checkpoints():
        stats = collect_eigenvalue_correction(model, tracked, eigens, make_batches(), dtype, generator)
        lam = stats if lam is None else lam + stats
    return build_factors(cov, eigens, lam)


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """θ̄_ℓ: the mean of the checkpoints' floating-point tensors (Fast-SOURCE, seeds §6.3; ASTRA-SOURCE's Ḡ, §7).

    Non-floating entries (integer buffers) are taken from the first state.
    """
    if not states:
        raise DastraError("cannot average parameters over zero checkpoints")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise DastraError(f"checkpoint {i}'s state dict has other keys than checkpoint 0's")
    out = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            out[key] = sum(s[key].to(torch.float64) for s in states).div(len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out
