"""Calibration queries for the build-time choice of the IVF probing (faiss_index.calibrate_nprobe).

A query of `dastra search` is a solved direction X_q = (G + λI)⁻¹ ∇f(z_q), projected: P_out X_q P_inᵀ. The
calibration draws stored documents m at random and puts their own training gradients into that form,

    x_m = P_out (G_EKFAC + λI)⁻¹ ∇L(z_m) P_inᵀ           (seeds §3, Eq 26-28: rotate, divide by Λ + λ, rotate back)

with the fitted EK-FAC factors and the solver's damping (solver.damping, auto = 0.1 mean Λ), so that the recall
the build measures is the recall of queries shaped like the real ones. Why not the stored vectors themselves: on the
demo store the nprobe that gives them leave-one-out recall@10 0.954 gives the EK-FAC query directions only 0.86
(docs/results/retrieval.md): (G + λI)⁻¹ moves a gradient's weight onto low-curvature directions, where the lists'
probing bound ranks differently. Without factors (`dastra index` before `dastra fit`) the stored vectors are used.
"""

from __future__ import annotations

import numpy as np
import torch

from distributed_astra.context import Context, factor_meta, run_damping
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import load_factors
from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.data.sequences import iter_document_batches
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import ekfac_inverse
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.projection import KroneckerProjection


def preconditioned_queries(
    ctx: Context, projection: KroneckerProjection, rows: list[int]
) -> tuple[np.ndarray, dict[str, object]] | None:
    """([len(rows), D] float32 x_m for the documents at corpus `rows`, what they are), or None without factors.

    Per sequence (the map is linear, so a document's x_m is the sum over its sequences): the full gradient
    G = Σ_t Ds_t ā_tᵀ per module, its EK-FAC damped inverse, then the store's projection.
    """
    try:
        factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    except DastraError:
        return None
    damping = run_damping(ctx)
    strategy = ctx.cfg.factors.strategy
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    documents = ctx.open_corpus().documents_at(rows)
    ordered = [documents[r] for r in sorted(documents)]
    batches = iter_document_batches(ordered, ctx.tokenizer, ctx.sequence_format, ctx.cfg.scoring.batch_size)
    totals: dict[int, torch.Tensor] = {}
    for batch, capture in captured_batches(ctx.model, ctx.tracked, batches, compute):
        grads = {name: sequence_gradients(capture.output_grad(name).float(), capture.activation(name).float())
                 for name in ctx.tracked}
        vectors = projection.project_matrices(ekfac_inverse(factors, grads, damping, strategy))
        for row, vector in zip(batch["row"].tolist(), vectors):
            totals[row] = totals.get(row, 0) + vector
    queries = np.stack([totals[row].numpy() for row in rows]).astype(np.float32)
    return queries, {"queries_kind": f"{strategy}-preconditioned training gradients", "damping": damping}
