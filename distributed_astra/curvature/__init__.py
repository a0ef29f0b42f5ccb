"""Curvature statistics for EK-FAC: gradient capture, Kronecker factors A and S, eigenbases, Λ, and factor I/O.

Plain functions and small dataclasses on tensors (no Ray, no DeepSpeed). Statistics are SUMS with counts, mergeable
with `+`, so that shards can be all-reduced before normalising.
"""

from distributed_astra.curvature.covariance import CovarianceStats, collect_covariances, sampled_fisher_capture
from distributed_astra.curvature.eigen import (
    KroneckerEigen,
    LambdaStats,
    collect_eigenvalue_correction,
    eigendecompose,
    eigendecompose_module,
)
from distributed_astra.curvature.factors import (
    EkfacFactors,
    ModuleFactors,
    build_factors,
    fit_ekfac,
    load_factors,
    load_factors_meta,
    model_fingerprint,
    save_factors,
)
from distributed_astra.curvature.hooks import GradientCapture, loss_sequence_mask

__all__ = [
    "CovarianceStats",
    "EkfacFactors",
    "GradientCapture",
    "KroneckerEigen",
    "LambdaStats",
    "ModuleFactors",
    "build_factors",
    "collect_covariances",
    "collect_eigenvalue_correction",
    "eigendecompose",
    "eigendecompose_module",
    "fit_ekfac",
    "load_factors",
    "load_factors_meta",
    "loss_sequence_mask",
    "model_fingerprint",
    "sampled_fisher_capture",
    "save_factors",
]
