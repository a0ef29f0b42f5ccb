"""Inverse-Hessian(GGN)-vector products (seeds §3-5).

- `ekfac`: the EK-FAC / KFAC damped inverse and matrix functions (the preconditioner P).
- `products`: curvature-vector products G̃·v on a minibatch (exact GGN, or the hook-only sampled-label Fisher).
- `solvers`: ekfac, sni, lissa and astra behind one `solve`, batched over queries.
- `monitor`: the objective h(x), residuals, stopping and divergence, and the trace table.
"""

from distributed_astra.ihvp.ekfac import default_damping, ekfac_inverse, ekfac_matrix_function
from distributed_astra.ihvp.monitor import trace_table
from distributed_astra.ihvp.products import CurvatureProduct, FisherProduct, GGNProduct
from distributed_astra.ihvp.solvers import MinibatchSampler, SolveResult, ekfac_preconditioner, solve

__all__ = [
    "CurvatureProduct",
    "FisherProduct",
    "GGNProduct",
    "MinibatchSampler",
    "SolveResult",
    "default_damping",
    "ekfac_inverse",
    "ekfac_matrix_function",
    "ekfac_preconditioner",
    "solve",
    "trace_table",
]
