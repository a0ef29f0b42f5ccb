"""Kronecker-factored random projection (scoring/projection.py) against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from distributed_astra.config import ProjectionConfig
from distributed_astra.curvature.hooks import GradientCapture
from distributed_astra.models.lm import forward_logits, summed_token_loss
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.projection import (
    KroneckerProjection,
    WhitenedProjection,
    orthogonal_projection,
)
from tests.conftest import assert_close_rel

SEEDS = 300
PATTERNS = ["transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.*"]


def _capture(model, tracked, batch):
    with GradientCapture(tracked, batch["attention_mask"], torch.float64) as capture:
        capture.backward(summed_token_loss(forward_logits(model, batch), batch["labels"]).sum())
    return capture


def _projection(tracked, out_dim, in_dim, seed=0, per_module=None):
    return KroneckerProjection.for_modules({n: tm.shape for n, tm in tracked.items()}, out_dim, in_dim, per_module, seed)


def test_orthogonal_rows():
    p = orthogonal_projection(5, 12, seed=3).double()
    torch.testing.assert_close(p @ p.t(), torch.eye(5, dtype=torch.float64) * 12 / 5, atol=1e-5, rtol=0)
    assert torch.equal(orthogonal_projection(5, 12, seed=3), orthogonal_projection(5, 12, seed=3))
    assert not torch.equal(orthogonal_projection(5, 12, seed=4), orthogonal_projection(5, 12, seed=3))
    assert torch.equal(orthogonal_projection(12, 12, seed=3), torch.eye(12))  # k ≥ side: exact


def test_per_token_projection_equals_kronecker_product_of_the_gradient(tiny_gpt2, tiny_batches):
    """Σ_t (P_out Ds_t)(P_in ā_t)ᵀ = P_out G P_inᵀ, and vec of it = (P_out ⊗ P_in) vec(G) (row-major).

    The projection runs in float32: its error is that of float32 sums of n ≈ 140 terms (out, in+1, tokens), at
    most n·ε₃₂ ≈ 2e-5 and typically √n·ε₃₂ ≈ 1.4e-6 of the terms' scale, i.e. of max|reference|, not of each
    element: 1e-5 of max|reference| (measured 1-3e-7; the old atol 1e-6 was half used on near-zero elements).
    """
    tracked = select_tracked_modules(tiny_gpt2, PATTERNS)
    projection = _projection(tracked, 5, 7, seed=11)
    capture = _capture(tiny_gpt2, tracked, tiny_batches[0])
    per_token = projection.project_tokens(capture.output_grads, capture.activations).double()
    grads = capture.per_sequence_gradients()  # [B, out, in+1] float64
    offset = 0
    for name, module in projection.modules.items():
        p_out, p_in = module.out_matrix.double(), module.in_matrix.double()
        reference = torch.einsum("ko,boi,li->bkl", p_out, grads[name], p_in).flatten(1)
        kron = grads[name].flatten(1) @ torch.kron(p_out, p_in).t()
        block = per_token[:, offset : offset + module.dim]
        assert_close_rel(block, reference, 1e-5, name)
        torch.testing.assert_close(kron, reference, rtol=1e-9, atol=1e-9)
        offset += module.dim
    # a query direction X [Q, out, in+1] is projected as P_out X P_inᵀ: the same map as the training side
    assert_close_rel(projection.project_matrices(grads).double(), per_token, 1e-5, "project_matrices")
    with pytest.raises(Exception, match=r"\[out, in\+1\] layout"):
        projection.project_matrices({n: g.transpose(1, 2) for n, g in grads.items()})


def test_full_dimension_is_exact(tiny_gpt2, tiny_batches):
    tracked = select_tracked_modules(tiny_gpt2, PATTERNS)
    projection = _projection(tracked, 10_000, 10_000)
    capture = _capture(tiny_gpt2, tracked, tiny_batches[1])
    directions = {n: torch.randn(3, *tm.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                  for n, tm in tracked.items()}
    exact = sequence_scores(capture.output_grads, capture.activations, directions)
    projected = projection.project_tokens(capture.output_grads, capture.activations) @ projection.project_matrices(directions).t()
    # float32 inner products over every tracked parameter (n ~ 10⁴ terms, √n·ε₃₂ ≈ 1.2e-5; measured 2.5e-7 of
    # max|exact|), relative to the scores' scale: the all-padding row's are exactly 0, others near 0 by cancellation
    assert_close_rel(projected.double(), exact, 1e-4, "full-dimension scores")


def _whitening_bases(tracked, seed=5):
    """Random orthonormal Q_S, Q_A and positive eigenvalues over four orders of magnitude per module, λ = 1e-2."""
    generator = torch.Generator().manual_seed(seed)
    bases = {}
    for name, tm in tracked.items():
        out_dim, in_dim = tm.shape
        q_s = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=generator, dtype=torch.float64))[0]
        q_a = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=generator, dtype=torch.float64))[0]
        eig = 10 ** (4 * torch.rand(out_dim, in_dim, generator=generator, dtype=torch.float64) - 4)
        bases[name] = (q_s, q_a, (eig + 1e-2).sqrt())
    return bases


def test_whitened_projection_keeps_the_score_and_is_exact_at_full_dimension(tiny_gpt2, tiny_batches):
    """⟨φ_W(G), ψ_W(X)⟩ = ⟨G, X⟩ at full dimension (orthogonal rotation, s ⊘ s = 1), for any direction X; at a
    compressive dimension the whitened sketch is a different estimate (not the plain projection's)."""
    tracked = select_tracked_modules(tiny_gpt2, PATTERNS)
    capture = _capture(tiny_gpt2, tracked, tiny_batches[1])
    directions = {n: torch.randn(3, *tm.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                  for n, tm in tracked.items()}
    exact = sequence_scores(capture.output_grads, capture.activations, directions)
    full = WhitenedProjection(_projection(tracked, 10_000, 10_000), _whitening_bases(tracked), 1e-2, "ekfac")
    assert full.describe()["whitening"] == {"damping": 1e-2, "strategy": "ekfac"}
    projected = full.project_tokens(capture.output_grads, capture.activations) @ full.project_matrices(directions).t()
    # float32 products of values whitened over 4 orders of magnitude: relative to the scores' scale, as above
    assert_close_rel(projected.double(), exact, 1e-3, "whitened full-dimension scores")
    small = _projection(tracked, 4, 4)
    whitened = WhitenedProjection(small, _whitening_bases(tracked), 1e-2, "ekfac")
    plain = small.project_tokens(capture.output_grads, capture.activations)
    assert whitened.dim == small.dim and not torch.allclose(
        whitened.project_tokens(capture.output_grads, capture.activations), plain)


def test_seeded_reproducible_and_per_module_dims(tiny_gpt2):
    tracked = select_tracked_modules(tiny_gpt2, PATTERNS)
    a = _projection(tracked, 6, 5, seed=7, per_module={"transformer.h.1.mlp.*": (3, 4)})
    b = _projection(dict(reversed(list(tracked.items()))), 6, 5, seed=7, per_module={"transformer.h.1.mlp.*": (3, 4)})
    c = _projection(tracked, 6, 5, seed=8)
    for name in tracked:
        assert torch.equal(a.modules[name].out_matrix, b.modules[name].out_matrix)  # module order does not matter
        assert torch.equal(a.modules[name].in_matrix, b.modules[name].in_matrix)
        assert not torch.equal(a.modules[name].in_matrix, c.modules[name].in_matrix)
    assert a.modules["transformer.h.1.mlp.c_fc"].shape == (3, 4)
    assert a.modules["transformer.h.0.mlp.c_fc"].shape == (6, 5)
    assert a.describe()["projection_dims"]["transformer.h.1.mlp.c_proj"] == [3, 4]
    assert a.dim == sum(m.dim for m in a.modules.values())


def test_johnson_lindenstrauss_unbiased_and_variance_falls_with_dimension():
    """Over many seeds the projected inner product averages to the exact one (within 4 standard errors), and its
    spread shrinks as k grows; E[PᵀP] = I for each side."""
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, tokens = 24, 17, 6
    ds, a = torch.randn(tokens, out_dim, generator=g, dtype=torch.float64), torch.randn(tokens, in_dim, generator=g, dtype=torch.float64)
    x = torch.randn(1, out_dim, in_dim, generator=g, dtype=torch.float64) + 0.5 * torch.einsum("to,ti->oi", ds, a)
    exact = float(torch.einsum("to,oi,ti->", ds, x[0], a))
    spreads = []
    for k_out, k_in in ((4, 3), (12, 9)):
        values, gram = [], torch.zeros(in_dim, in_dim, dtype=torch.float64)
        for seed in range(SEEDS):
            projection = KroneckerProjection({"m": (out_dim, in_dim)}, {"m": (k_out, k_in)}, seed)
            train = projection.project_tokens({"m": ds[None]}, {"m": a[None]}).double()
            query = projection.project_matrices({"m": x}).double()
            values.append(float(train @ query.t()))
            p_in = projection.modules["m"].in_matrix.double()
            gram += p_in.t() @ p_in / SEEDS
        values = np.array(values)
        standard_error = values.std() / np.sqrt(len(values))
        assert abs(values.mean() - exact) < 4 * standard_error, (k_out, k_in, values.mean(), exact, standard_error)
        torch.testing.assert_close(gram, torch.eye(in_dim, dtype=torch.float64), atol=0.25, rtol=0)
        spreads.append(values.std())
    assert spreads[1] < 0.6 * spreads[0]


def test_projected_scores_track_exact_scores_at_the_default_dimension(tiny_gpt2_factory, batch_factory):
    """Spearman ≥ 0.9 per query between projected and exact scores, default 16 x 16 per module, tiny GPT-2.

    The directions are query gradients (gradient similarity, the large-damping limit of the iHVP). With EK-FAC
    directions at the auto damping the needed dimension grows with the effective dimension Σ Λ/(Λ+λ) (see
    docs/results/retrieval.md); there the agreement at this dimension is much lower.
    """
    from distributed_astra.models.load import prepare_for_attribution

    model = prepare_for_attribution(tiny_gpt2_factory(n_embd=16, n_head=2, vocab_size=128, dtype=torch.float32))
    tracked = select_tracked_modules(model, ["transformer.h.*"])
    defaults = ProjectionConfig()
    projection = _projection(tracked, defaults.out_dim, defaults.in_dim, defaults.seed)
    assert projection.dim < 0.35 * sum(tm.shape[0] * tm.shape[1] for tm in tracked.values())  # a real compression
    train = batch_factory(num_batches=8, batch_size=16, seq_len=24, vocab_size=128, seed=1)
    queries = batch_factory(num_batches=1, batch_size=8, seq_len=24, vocab_size=128, seed=2, prompt_len=4)
    _, capture = next(captured_batches(model, tracked, queries, torch.float64))
    directions = {n: g.float() for n, g in capture.per_sequence_gradients().items()}
    projected_directions = projection.project_matrices(directions)
    exact, projected = [], []
    for _, capture in captured_batches(model, tracked, train, torch.float32):
        exact.append(sequence_scores(capture.output_grads, capture.activations, directions))
        projected.append(projection.project_tokens(capture.output_grads, capture.activations) @ projected_directions.t())
    exact, projected = torch.cat(exact).numpy(), torch.cat(projected).numpy()
    rho = [spearmanr(exact[:, q], projected[:, q]).statistic for q in range(exact.shape[1])]
    assert min(rho) >= 0.9, rho
