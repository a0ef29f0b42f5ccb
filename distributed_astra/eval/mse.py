"""Curvature of a scalar-output regression model with loss ½(g − t)²: EK-FAC factors and the GGN product.

The package's `curvature.fit_ekfac` and `ihvp.GGNProduct` are written for softmax cross-entropy. For the squared
error the output Hessian is H = 1, so the GGN of the mean loss is exactly (seeds §2, Eq 12)

    G = (1/N) Σ_n J_n J_nᵀ,     J_n = ∇θ g(x_n)

and the true Fisher needs no label sampling: the "Fisher gradient" of example n is J_n itself (cotangent 1 on the
output). Everything below is the package's own machinery fed with that deterministic gradient: `GradientCapture`
for ā and Ds, `CovarianceStats`, `eigendecompose`, `LambdaStats` with `rotated_squared_gradients`, `build_factors`
(seeds §3), and `sequence_scores` / `weighted_gradient_sum` for G·v = (1/N_B) Σ_n J_n (J_nᵀ v).

Batches follow `eval/tasks.py`'s tabular layout (one-token sequences, output at position 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from distributed_astra.curvature.covariance import CovarianceStats, batch_to_device, model_device, product_dtype
from distributed_astra.curvature.eigen import LambdaStats, eigendecompose, rotated_squared_gradients
from distributed_astra.curvature.factors import EkfacFactors, build_factors
from distributed_astra.curvature.hooks import GradientCapture, loss_sequence_mask
from distributed_astra.ihvp.products import Batch, CurvatureProduct, Vectors, check_vectors, vec_to, vec_zeros_like
from distributed_astra.ihvp.products import weighted_gradient_sum
from distributed_astra.models.modules import TrackedModule
from distributed_astra.scoring.inner_products import sequence_scores


def output_jacobian_capture(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: Batch, dtype: torch.dtype
) -> GradientCapture:
    """ā and Ds of every tracked module for the backward of Σ_n g(x_n): Ds_n = ∂g_n/∂s_n, so DW̄_n = J_n."""
    with torch.enable_grad(), GradientCapture(tracked, batch["attention_mask"], dtype) as capture:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        capture.backward(out[:, 0, 0].sum())
    return capture


def fit_ekfac_mse(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    make_batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    dtype: torch.dtype = torch.float64,
) -> EkfacFactors:
    """EK-FAC of G = (1/N) Σ_n J_n J_nᵀ: covariances, eigenbases, eigenvalue correction Λ (seeds §3, Eq 28).

    Same normalisation as `fit_ekfac`: A and S per token, Λ per sequence (here both per example).
    """
    device = model_device(model)
    compute = product_dtype(model, dtype)
    cov = CovarianceStats.zeros(tracked, dtype, device)
    for batch in make_batches():
        batch = batch_to_device(batch, device)
        capture = output_jacobian_capture(model, tracked, batch, compute)
        for name in tracked:
            a = capture.activation(name).flatten(0, -2)
            ds = capture.output_grad(name).flatten(0, -2)
            cov.a_sum[name] += (a.T @ a).to(dtype)
            cov.s_sum[name] += (ds.T @ ds).to(dtype)
        cov.num_tokens += int((batch["attention_mask"] != 0).sum())
        cov.num_sequences += int(loss_sequence_mask(batch["labels"]).sum())
    eigens = eigendecompose(cov)
    lam = LambdaStats.zeros(tracked, dtype, device)
    for batch in make_batches():
        batch = batch_to_device(batch, device)
        capture = output_jacobian_capture(model, tracked, batch, compute)
        for name in tracked:
            eig = eigens[name].to(device)
            lam.lambda_sum[name] += rotated_squared_gradients(
                capture.output_grad(name), capture.activation(name), eig
            ).to(dtype)
        lam.num_sequences += int(loss_sequence_mask(batch["labels"]).sum())
    return build_factors(cov, eigens, lam)


class MSEGGNProduct(CurvatureProduct):
    """Exact minibatch GGN·v of the squared error: Σ_n J_n (J_nᵀ v) over the batch (divided by N_B in `product`)."""

    def __init__(self, model: nn.Module, tracked: dict[str, TrackedModule]) -> None:
        self.model = model
        self.tracked = tracked

    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        check_vectors(vectors, self.tracked)
        device = model_device(self.model)
        batch = batch_to_device(dict(batch), device)
        out_dtype = next(iter(vectors.values())).dtype
        target = next(iter(vectors.values())).device
        compute = product_dtype(self.model, out_dtype)
        v = vec_to(vectors, device=device, dtype=compute)
        capture = output_jacobian_capture(self.model, self.tracked, batch, compute)
        ds = {n: capture.output_grad(n) for n in self.tracked}
        abar = {n: capture.activation(n) for n in self.tracked}
        coeff = sequence_scores(ds, abar, v)  # [B, Q] = J_nᵀ v_q
        total = vec_zeros_like(v)
        for n in self.tracked:
            total[n] += weighted_gradient_sum(ds[n], abar[n], coeff)
        count = int(loss_sequence_mask(batch["labels"]).sum())
        return vec_to(total, device=target, dtype=out_dtype), count
