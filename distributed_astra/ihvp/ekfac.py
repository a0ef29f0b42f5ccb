"""The EK-FAC (or KFAC) damped inverse and matrix functions, module by module (seeds §3, Eqs 26-28).

For a gradient V̄ in the [out, in+1] layout and a module's factors:

    X = Q_Sᵀ V̄ Q_A                 rotate into the Kronecker eigenbasis
    X ← φ(Λ) ⊙ X                   Λ: EK-FAC's corrected eigenvalues, or KFAC's tokens_per_sequence · d_S d_Aᵀ
    result = Q_S X Q_Aᵀ            rotate back

With φ(σ) = 1/(σ + λ) this is (G_EKFAC + λI)⁻¹ v. Gradients may carry leading batch dimensions ([Q, out, in+1]);
the computation runs in the factors' dtype (float64 by default) and the result is returned in that dtype on the
gradients' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distributed_astra.curvature.factors import EkfacFactors, mean_from_sums
from distributed_astra.errors import DastraError

STRATEGIES = ("ekfac", "kfac")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise DastraError(f"strategy '{strategy}' is not one of: {', '.join(STRATEGIES)}")


def ekfac_matrix_function(
    factors: EkfacFactors,
    grads: dict[str, torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor],
    strategy: str = "ekfac",
) -> dict[str, torch.Tensor]:
    """φ(G) v per module, G being G_EKFAC ("ekfac") or KFAC ("kfac"), φ applied elementwise to the eigenvalues.

    Examples: φ(σ) = 1/(σ+λ) (damped inverse), φ(σ) = exp(-cσ), φ(σ) = -expm1(-cσ)/σ (SOURCE).
    """
    _check_strategy(strategy)
    out = {}
    for name, v in grads.items():
        f = factors[name]
        if tuple(v.shape[-2:]) != f.shape:
            raise DastraError(
                f"gradient of module '{name}' has shape {tuple(v.shape)}, the factors expect [..., {f.shape[0]}, "
                f"{f.shape[1]}] ([out, in+1] layout): were the factors fitted for another model?"
            )
        dtype, device = factors.dtype, v.device
        q_a = f.q_a.to(device=device, dtype=dtype)
        q_s = f.q_s.to(device=device, dtype=dtype)
        eig = factors.eigenvalues(name, strategy).to(device=device, dtype=dtype)
        x = q_s.T @ v.to(dtype) @ q_a
        x = x * fn(eig)
        out[name] = q_s @ x @ q_a.T
    return out


def ekfac_inverse(
    factors: EkfacFactors,
    grads: dict[str, torch.Tensor],
    damping: float,
    strategy: str = "ekfac",
) -> dict[str, torch.Tensor]:
    """(G + λI)⁻¹ v per module, with G = G_EKFAC ("ekfac") or KFAC ("kfac") and λ = `damping` ≥ 0.

    grads: name -> [out, in+1] or [Q, out, in+1]; only the modules present are processed.
    """
    damping = float(damping)
    if not damping >= 0.0:  # also rejects NaN
        raise DastraError(f"damping must be a non-negative number, got {damping}")
    return ekfac_matrix_function(factors, grads, lambda eig: 1.0 / (eig + damping), strategy)


DAMPING_SCALE = 0.1  # kronfluence's heuristic: λ = 0.1 × mean eigenvalue


def default_damping(factors: EkfacFactors, strategy: str = "ekfac") -> float:
    """kronfluence's heuristic λ = DAMPING_SCALE × `mean_eigenvalue` (seeds §3)."""
    return DAMPING_SCALE * mean_eigenvalue(factors, strategy)


def mean_eigenvalue(factors: EkfacFactors, strategy: str = "ekfac") -> float:
    """The mean of the eigenvalues over all tracked entries: every (module, b, a) entry together, i.e. weighted by
    module size, of Λ for "ekfac" (of the KFAC eigenvalues for "kfac"). Λ has the per-sequence scale of G."""
    _check_strategy(strategy)
    return mean_from_sums(*factors.eigenvalue_sum(strategy))
