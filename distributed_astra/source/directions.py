"""SOURCE and ASTRA-SOURCE query directions and scores (seeds §6.2, Eq 16; §7).

With segments ℓ = 0 … L−1 (horizon c_ℓ = η_eff,ℓ K_ℓ, curvature shift s_ℓ; `segments.py`) and segment-averaged
curvatures Ḡ_ℓ (EK-FAC, `averaging.py`), the SOURCE score of training example z_m for query z_q is

    τ(z_m, z_q) = Σ_ℓ ∇f_zqᵀ S̄_{L−1} ⋯ S̄_{ℓ+1} r̄_ℓ(z_m),   S̄_ℓ = exp(−c_ℓ(Ḡ_ℓ + s_ℓ)),   r̄_ℓ = φ_ℓ(Ḡ_ℓ) ḡ_ℓ(z_m)

(the 1/N dropped, as for IF; positive = helpful, the sign that makes L = 1 SOURCE equal IF, seeds §13.2). All
matrices are symmetric, so it is computed query-side, "left to right" (§7):

    u_{L−1} = ∇f,   u_ℓ = S̄_{ℓ+1} u_{ℓ+1},   w_ℓ = φ_ℓ(Ḡ_ℓ) u_ℓ,   τ = Σ_ℓ w_ℓᵀ ḡ_ℓ(z_m)

and ḡ_ℓ(z_m) = mean over the segment's checkpoints c of ∇L(θ_c, z_m), so τ = Σ_ℓ mean_c w_ℓᵀ ∇L(θ_c, z_m).
φ_ℓ, per eigenvalue σ of Ḡ_ℓ (σ' = σ + s_ℓ):

    "exp"     (1 − e^{−c σ'}) / σ'   (limit c at σ' = 0): EK-FAC-SOURCE's r̄
    "damped"  1 / (σ' + 1/c)                           : r̃, the damped iHVP (Ḡ_ℓ + λ_ℓ I)⁻¹, λ_ℓ = s_ℓ + 1/c_ℓ

ASTRA-SOURCE keeps the EK-FAC S̄ and solves w_ℓ = (Ḡ_ℓ + λ_ℓ I)⁻¹ u_ℓ with ASTRA (`ihvp.solve`), preconditioned
by segment ℓ's EK-FAC with λ̃_ℓ = λ_ℓ and started at its EK-FAC solution, so 0 iterations give "damped" exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from distributed_astra.config import SolverConfig
from distributed_astra.curvature.factors import EkfacFactors
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import ekfac_matrix_function
from distributed_astra.ihvp.monitor import OnIteration
from distributed_astra.ihvp.products import CurvatureProduct, Vectors
from distributed_astra.ihvp.solvers import SolveResult, ekfac_preconditioner, solve
from distributed_astra.source.segments import Segment

VARIANTS = ("exp", "damped")


def response(horizon: float, shift: float, variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """φ(σ) of r̄ (variant "exp") or r̃ ("damped") for a segment of horizon c and curvature shift s (module doc)."""
    if variant not in VARIANTS:
        raise DastraError(f"SOURCE variant '{variant}' is not one of: {', '.join(VARIANTS)}")
    if not horizon > 0:
        raise DastraError(f"SOURCE segment horizon η_eff·K must be positive, got {horizon}")
    if variant == "damped":
        return lambda sigma: 1.0 / (sigma + shift + 1.0 / horizon)

    def exp_form(sigma: torch.Tensor) -> torch.Tensor:
        s = (sigma + shift).clamp_min(0.0)  # round-off negatives of a PSD curvature
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.where(s > 0, -torch.expm1(-horizon * safe) / safe, torch.full_like(s, horizon))

    return exp_form


def forgetting(horizon: float, shift: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """φ(σ) = exp(−c(σ + s)) of S̄ (seeds Eq 16)."""
    return lambda sigma: torch.exp(-horizon * (sigma + shift).clamp_min(0.0))


def _check(factors: Sequence[EkfacFactors], segments: Sequence[Segment]) -> None:
    if len(factors) != len(segments) or not segments:
        raise DastraError(f"SOURCE needs one EK-FAC per segment: got {len(factors)} for {len(segments)} segments")


def propagated_queries(
    query_grads: Vectors, factors: Sequence[EkfacFactors], segments: Sequence[Segment], strategy: str = "ekfac"
) -> list[Vectors]:
    """u_ℓ = S̄_{ℓ+1} ⋯ S̄_{L−1} ∇f for every segment ℓ (u_{L−1} = ∇f), EK-FAC-based S̄ (seeds §7, step 1)."""
    _check(factors, segments)
    out: list[Vectors] = [query_grads]
    for seg_factors, seg in zip(reversed(factors[1:]), reversed(segments[1:])):
        out.append(ekfac_matrix_function(seg_factors, out[-1], forgetting(seg.horizon, seg.shift), strategy))
    return out[::-1]


def source_directions(
    query_grads: Vectors,
    factors: Sequence[EkfacFactors],
    segments: Sequence[Segment],
    variant: str = "exp",
    strategy: str = "ekfac",
) -> list[Vectors]:
    """EK-FAC-SOURCE: w_ℓ = φ_ℓ(Ḡ_ℓ) u_ℓ per segment ({module: [Q, out, in+1]}, in the factors' dtype)."""
    us = propagated_queries(query_grads, factors, segments, strategy)
    return [
        ekfac_matrix_function(f, u, response(seg.horizon, seg.shift, variant), strategy)
        for f, seg, u in zip(factors, segments, us)
    ]


def astra_source_directions(
    query_grads: Vectors,
    factors: Sequence[EkfacFactors],
    segments: Sequence[Segment],
    products: Sequence[CurvatureProduct],
    batches: Sequence[Iterable[Mapping[str, torch.Tensor]]],
    cfg: SolverConfig,
    strategy: str = "ekfac",
    query_ids: Sequence[str] | None = None,
    on_iteration: Callable[[int], OnIteration | None] | None = None,
) -> list[SolveResult]:
    """ASTRA-SOURCE: per segment, w_ℓ = (Ḡ_ℓ + λ_ℓI)⁻¹ u_ℓ by ASTRA (cfg.name must be "astra"; cfg.damping is
    ignored, λ_ℓ = `segments[ℓ].damping`; α = cfg.lr × λ_ℓ in "relative" mode, as in seeds Table 3).

    products[ℓ] gives G̃ of segment ℓ (the seeds' option 3: a model at the averaged weights θ̄_ℓ) on the minibatches
    batches[ℓ]; on_iteration(ℓ) may return the solver's per-iteration callback for segment ℓ.
    """
    if cfg.name != "astra":
        raise DastraError(f"ASTRA-SOURCE runs the astra solver, but solver.name is '{cfg.name}'")
    _check(factors, segments)
    if len(products) != len(segments) or len(batches) != len(segments):
        raise DastraError(
            f"ASTRA-SOURCE needs one curvature product and one minibatch source per segment ({len(segments)}), "
            f"got {len(products)} and {len(batches)}"
        )
    us = propagated_queries(query_grads, factors, segments, strategy)
    return [
        astra_segment_direction(
            u, f, seg, products[index], batches[index], cfg, strategy, query_ids,
            on_iteration(index) if on_iteration is not None else None,
        )
        for index, (f, seg, u) in enumerate(zip(factors, segments, us))
    ]


def astra_segment_direction(
    u: Vectors,
    factors: EkfacFactors,
    segment: Segment,
    product: CurvatureProduct,
    batches: Iterable[Mapping[str, torch.Tensor]],
    cfg: SolverConfig,
    strategy: str = "ekfac",
    query_ids: Sequence[str] | None = None,
    on_iteration: OnIteration | None = None,
) -> SolveResult:
    """One segment of ASTRA-SOURCE (seeds §7, step 2): w_ℓ = (Ḡ_ℓ + λ_ℓI)⁻¹ u_ℓ by ASTRA, preconditioned by the
    segment's EK-FAC with λ̃_ℓ = λ_ℓ and started at its solution; `product` gives G̃ at the segment's weights."""
    if cfg.name != "astra":
        raise DastraError(f"ASTRA-SOURCE runs the astra solver, but solver.name is '{cfg.name}'")
    lam = segment.damping
    return solve(u, ekfac_preconditioner(factors, cfg, lam, strategy), product, batches, cfg, lam,
                 query_ids=query_ids, on_iteration=on_iteration)


def source_scores(directions: Sequence[Vectors], train_grads: Sequence[Sequence[Vectors]]) -> torch.Tensor:
    """τ [Q, N] = Σ_ℓ mean_c w_ℓᵀ ∇L(θ_c, z_m): directions[ℓ] {module: [Q, out, in+1]}, train_grads[ℓ][c]
    {module: [N, out, in+1]} the per-example training gradients at checkpoint c of segment ℓ.

    Dense and in memory: for small problems and tests; streamed scoring reuses `scoring.inner_products` with the
    same directions per checkpoint.
    """
    if len(directions) != len(train_grads):
        raise DastraError(f"{len(directions)} segment directions but training gradients for {len(train_grads)}")
    total = None
    for w, grads in zip(directions, train_grads):
        if not grads:
            raise DastraError("a SOURCE segment has no checkpoint gradients")
        for g in grads:
            part = pairwise(w, g) / len(grads)
            total = part if total is None else total + part
    return total


def pairwise(w: Vectors, g: Vectors) -> torch.Tensor:
    """[Q, N] inner products Σ_modules ⟨w_q, g_n⟩."""
    total = None
    for name, t in w.items():
        other = g[name].to(t.dtype)
        part = t.flatten(1) @ other.flatten(1).T
        total = part if total is None else total + part
    return total
