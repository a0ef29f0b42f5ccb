"""The projection of the store and its queries: whitened in the EK-FAC eigenbasis when the factors exist.

`projection.whiten` (default true): `dastra index` and `dastra search` project with
scoring/projection.py's `WhitenedProjection` built from the fitted factors (factors/) and the solver's damping,
and with the plain `KroneckerProjection` when there are no factors (an index built before `dastra fit`). The store
and index record which (`whitening` in their meta.json: damping and strategy, or null), so a search whose factors
or damping differ from the store's is refused, naming that field. Measured on the demo (docs/results/retrieval.md):
the whitened store keeps about twice the exhaustive exact top-10 of the plain one at the same dimension and the
same shortlist (EK-FAC directions at 5% of the corpus re-scored: 0.54 against 0.30 at 16 x 16 per module, 0.955
against 0.75 at 64 x 64).
"""

from __future__ import annotations

from distributed_astra.context import Context, factor_meta, run_damping
from distributed_astra.curvature.factors import load_factors
from distributed_astra.errors import DastraError
from distributed_astra.scoring.projection import KroneckerProjection, WhitenedProjection

def store_projection(ctx: Context) -> KroneckerProjection:
    """The projection of `projection.*` (seed, dims), whitened with the fitted factors when `projection.whiten` and they exist."""
    cfg = ctx.cfg.projection
    shapes = {name: tm.shape for name, tm in ctx.tracked.items()}
    base = KroneckerProjection.for_modules(shapes, cfg.out_dim, cfg.in_dim, cfg.per_module, cfg.seed)
    if not cfg.whiten or not (ctx.paths.factors / "meta.json").is_file():
        return base
    try:
        factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    except DastraError:  # factors of another model or corpus: the plain projection (recorded as whitening: null)
        return base
    damping = run_damping(ctx)
    strategy = ctx.cfg.factors.strategy
    bases = {}
    for name in shapes:
        f = factors[name]
        bases[name] = (f.q_s, f.q_a, (factors.eigenvalues(name, strategy).double() + damping).sqrt())
    return WhitenedProjection(base, bases, damping, strategy)
