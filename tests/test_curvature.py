"""Gradient capture, Kronecker statistics, eigenvalue correction and factor I/O, against independent references."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from distributed_astra.curvature import (
    CovarianceStats,
    GradientCapture,
    collect_covariances,
    collect_eigenvalue_correction,
    eigendecompose,
    fit_ekfac,
    load_factors,
    load_factors_meta,
    model_fingerprint,
    save_factors,
)
from distributed_astra.errors import DastraError
from distributed_astra.ihvp import ekfac_inverse, ekfac_matrix_function
from distributed_astra.models.lm import forward_logits, sample_labels, summed_token_loss
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules
from tests.conftest import assert_same_eigendecomposition

ALL = [f"transformer.h.*.{m}" for m in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def unfrozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.requires_grad_(True)
    return ref


def param_gradient(tm, loss: torch.Tensor) -> torch.Tensor:
    """∂loss/∂W̄ in the [out, in+1] layout, through plain autograd on the module's parameters."""
    params = [tm.module.weight] + ([tm.module.bias] if tm.has_bias else [])
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return tm.from_parameter_layout(grads[0], grads[1] if tm.has_bias else None)


# ------------------------------------------------------------------------------------------------ capture
def test_per_sequence_gradients_match_autograd(tiny_gpt2, tiny_batches):
    tracked = select_tracked_modules(tiny_gpt2, ALL)
    batch = tiny_batches[0]
    with GradientCapture(tracked, batch["attention_mask"], torch.float64) as capture:
        loss = summed_token_loss(forward_logits(tiny_gpt2, batch), batch["labels"]).sum()
        capture.backward(loss)
    ours = capture.per_sequence_gradients()

    ref = unfrozen_copy(tiny_gpt2)
    ref_tracked = select_tracked_modules(ref, ALL)
    per_seq = summed_token_loss(forward_logits(ref, batch), batch["labels"])
    assert all(t.is_conv1d for t in ref_tracked.values())
    for n in range(per_seq.shape[0]):
        for name, tm in ref_tracked.items():
            expected = param_gradient(tm, per_seq[n])
            assert ours[name].shape == (per_seq.shape[0], *tm.shape)
            if expected.norm() == 0:  # the all-padding row
                assert ours[name][n].abs().max() == 0
            else:
                assert rel(ours[name][n], expected) < 1e-10, (name, n)
    # activations: ones column for the bias, zero rows (bias included) at padding
    a = capture.activation("transformer.h.0.mlp.c_fc")
    mask = batch["attention_mask"].bool()
    assert torch.all(a[..., -1][mask] == 1) and torch.all(a[~mask] == 0)
    assert torch.all(capture.output_grad("transformer.h.0.mlp.c_fc")[~mask] == 0)


def test_capture_requires_prepared_model(tiny_gpt2_factory, tiny_batches):
    model = tiny_gpt2_factory()
    model.requires_grad_(False)  # frozen, but input embeddings do not require grad: outputs carry no graph
    tracked = select_tracked_modules(model, ALL)
    with pytest.raises(DastraError, match="prepare_for_attribution"):
        with GradientCapture(tracked, tiny_batches[0]["attention_mask"]):
            forward_logits(model, tiny_batches[0])


def test_non_finite_gradient_names_the_module(tiny_gpt2, tiny_batches):
    tracked = select_tracked_modules(tiny_gpt2, ALL)
    target = "transformer.h.1.mlp.c_fc"
    seen = {}
    handle = tracked[target].module.register_forward_hook(lambda m, i, o: seen.update(out=o))
    batch = tiny_batches[0]
    try:
        with pytest.raises(DastraError, match=f"non-finite gradient in module {target}"):
            with GradientCapture(tracked, batch["attention_mask"]) as capture:
                loss = summed_token_loss(forward_logits(tiny_gpt2, batch), batch["labels"]).sum()
                o = seen["out"][0, 0, 0]
                loss = loss + torch.sqrt(o - o.detach())  # d/dx sqrt(x - x0) at x0 = +inf
                capture.backward(loss)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------- statistics vs brute force
def reference_statistics(model, tracked_patterns, batches, gen, eigens=None):
    """Without `eigens`: A, S sums by explicit loops over real positions. With `eigens`: Λ sums from per-sequence
    parameter gradients computed with plain autograd on an un-frozen copy. Labels drawn like the package does."""
    ref = unfrozen_copy(model)
    tracked = select_tracked_modules(ref, tracked_patterns)
    a_sum = {n: 0.0 for n in tracked}
    s_sum = {n: 0.0 for n in tracked}
    lam_sum = {n: 0.0 for n in tracked}
    tokens = sequences = 0
    for batch in batches:
        store = {}
        hooks = [
            tm.module.register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, (i[0], o)))
            for name, tm in tracked.items()
        ]
        logits = forward_logits(ref, batch)
        for h in hooks:
            h.remove()
        labels = sample_labels(logits, batch["labels"], gen)
        per_seq = summed_token_loss(logits, labels)
        for _, out in store.values():
            out.retain_grad()
        if eigens is None:
            per_seq.sum().backward(retain_graph=True)
            mask = batch["attention_mask"]
            for b in range(mask.shape[0]):
                for t in range(mask.shape[1]):
                    if mask[b, t] == 0:
                        continue
                    tokens += 1
                    for name, (inp, out) in store.items():
                        abar = torch.cat([inp[b, t].detach(), torch.ones(1, dtype=inp.dtype)])
                        a_sum[name] = a_sum[name] + torch.outer(abar, abar)
                        s_sum[name] = s_sum[name] + torch.outer(out.grad[b, t], out.grad[b, t])
        else:
            for n in range(per_seq.shape[0]):
                if not (labels[n, 1:] != -100).any():
                    continue
                sequences += 1
                for name, tm in tracked.items():
                    g = param_gradient(tm, per_seq[n])
                    lam_sum[name] = lam_sum[name] + (eigens[name].q_s.T @ g @ eigens[name].q_a) ** 2
    return a_sum, s_sum, tokens, lam_sum, sequences


def test_statistics_match_brute_force(tiny_gpt2, tiny_batches):
    """A and S are per-token averages over real positions (labelled or not); Λ is a per-sequence average."""
    patterns = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.*"]
    tracked = select_tracked_modules(tiny_gpt2, patterns)
    gen = torch.Generator().manual_seed(7)
    cov = collect_covariances(tiny_gpt2, tracked, tiny_batches, torch.float64, gen)
    eigens = eigendecompose(cov)
    lam = collect_eigenvalue_correction(tiny_gpt2, tracked, eigens, tiny_batches, torch.float64, gen)

    ref_gen = torch.Generator().manual_seed(7)
    a_ref, s_ref, tokens, _, _ = reference_statistics(tiny_gpt2, patterns, tiny_batches, ref_gen)
    assert cov.num_tokens == tokens == int(sum(b["attention_mask"].sum() for b in tiny_batches))
    loss_rows = sum(int((b["labels"][:, 1:] != -100).any(1).sum()) for b in tiny_batches)
    assert cov.num_sequences == loss_rows == sum(b["input_ids"].shape[0] - 1 for b in tiny_batches)  # empty rows
    for name in tracked:
        assert rel(cov.covariance_a(name), a_ref[name] / tokens) < 1e-12
        assert rel(cov.covariance_s(name), s_ref[name] / tokens) < 1e-12

    # Λ: ref_gen is now in the state the package's generator had after pass 1 (same label draws)
    _, _, _, lam_ref, seqs = reference_statistics(tiny_gpt2, patterns, tiny_batches, ref_gen, eigens)
    assert lam.num_sequences == seqs == loss_rows
    for name in tracked:
        assert rel(lam.corrected_eigenvalues(name), lam_ref[name] / seqs) < 1e-10


def test_statistics_merge_across_shards(tiny_gpt2, batch_factory):
    tracked = select_tracked_modules(tiny_gpt2, ["transformer.h.0.mlp.*"])
    batches = batch_factory(num_batches=4, batch_size=3, seq_len=10, seed=3)
    full = collect_covariances(tiny_gpt2, tracked, batches, torch.float64, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    part = collect_covariances(tiny_gpt2, tracked, batches[:1], torch.float64, gen)
    part = part + collect_covariances(tiny_gpt2, tracked, batches[1:], torch.float64, gen)
    assert (part.num_tokens, part.num_sequences) == (full.num_tokens, full.num_sequences)
    for name in tracked:
        assert rel(part.a_sum[name], full.a_sum[name]) < 1e-13
        assert rel(part.s_sum[name], full.s_sum[name]) < 1e-13
    eigens = eigendecompose(full)
    gen = torch.Generator().manual_seed(2)
    lam_full = collect_eigenvalue_correction(tiny_gpt2, tracked, eigens, batches, torch.float64, gen)
    gen = torch.Generator().manual_seed(2)
    lam = collect_eigenvalue_correction(tiny_gpt2, tracked, eigens, batches[:2], torch.float64, gen)
    lam = lam + collect_eigenvalue_correction(tiny_gpt2, tracked, eigens, batches[2:], torch.float64, gen)
    assert lam.num_sequences == lam_full.num_sequences
    for name in tracked:
        assert rel(lam.lambda_sum[name], lam_full.lambda_sum[name]) < 1e-13


# ------------------------------------------------------------------------------------ Conv1D == nn.Linear
def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A copy where every HF Conv1D is an nn.Linear with the transposed weight (the same function)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
            lin = nn.Linear(in_f, out_f, dtype=module.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(module.weight.T)
                lin.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, lin)
    return model


def test_conv1d_and_linear_give_identical_factors(tiny_gpt2_factory, batch_factory):
    conv_model = prepare_for_attribution(tiny_gpt2_factory(seed=3))
    lin_model = prepare_for_attribution(conv1d_to_linear(conv_model))
    conv_tracked = select_tracked_modules(conv_model, ALL)
    lin_tracked = select_tracked_modules(lin_model, ALL)
    assert all(t.is_conv1d for t in conv_tracked.values()) and not any(t.is_conv1d for t in lin_tracked.values())
    assert conv_tracked["transformer.h.0.attn.c_proj"].shape == (16, 17)  # square module: in == out == 16
    batches = batch_factory(num_batches=4, batch_size=6, seq_len=16, seed=5, prompt_len=2)

    f_conv = fit_ekfac(conv_model, conv_tracked, lambda: batches, torch.float64, seed=11)
    f_lin = fit_ekfac(lin_model, lin_tracked, lambda: batches, torch.float64, seed=11)
    assert (f_conv.num_tokens, f_conv.num_sequences) == (f_lin.num_tokens, f_lin.num_sequences)
    g = torch.Generator().manual_seed(0)
    for name in conv_tracked:
        c, l = f_conv[name], f_lin[name]
        assert c.shape == l.shape == conv_tracked[name].shape
        # The same float64 statistics up to summation order (A and S differ by ~1e-15 relative): eigenvalues,
        # Q diag(λ) Qᵀ, and each eigenvector up to sign within its Davis-Kahan bound, which is loose only for the
        # near-degenerate pairs (smallest relative gap 2e-7 at these seeds) whose columns round-off may rotate.
        assert_same_eigendecomposition(c.eigval_a, c.q_a, l.eigval_a, l.q_a, 1e-9)
        assert_same_eigendecomposition(c.eigval_s, c.q_s, l.eigval_s, l.q_s, 1e-9)
        # Λ and the products depend on the bases, which round-off moves by ~1e-15 / gap ≤ 1e-8: Λ is sign-invariant
        assert rel(c.lambda_, l.lambda_) < 1e-8
        v = {name: torch.randn(3, *c.shape, generator=g, dtype=torch.float64)}
        assert rel(ekfac_inverse(f_conv, v, 1e-3)[name], ekfac_inverse(f_lin, v, 1e-3)[name]) < 1e-8
        assert rel(
            ekfac_matrix_function(f_conv, v, lambda s: s)[name], ekfac_matrix_function(f_lin, v, lambda s: s)[name]
        ) < 1e-8


# ---------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
def test_bf16_model_gives_full_precision_orthonormal_factors(tiny_gpt2_factory, batch_factory, stat_dtype):
    model = prepare_for_attribution(tiny_gpt2_factory(dtype=torch.bfloat16))
    tracked = select_tracked_modules(model, ALL)
    batches = batch_factory(num_batches=3, batch_size=6, seq_len=16, seed=2)
    factors = fit_ekfac(model, tracked, lambda: batches, stat_dtype, seed=0)
    eps = torch.finfo(stat_dtype).eps
    for name, f in factors.modules.items():
        for field in ("q_a", "q_s", "eigval_a", "eigval_s", "lambda_"):
            t = getattr(f, field)
            assert t.dtype == stat_dtype and bool(torch.isfinite(t).all()), (name, field)
        # eigh's eigenvectors are orthonormal to O(n ε) in the statistics' dtype (measured ≤ 0.8 n ε on AVX2 and
        # AVX-512 kernels, float32 and float64): 10 n ε, n the factor's side (a fixed 1e-5 was 1.3 n ε at n = 65)
        for q in (f.q_a, f.q_s):
            n = q.shape[0]
            err = float((q.T @ q - torch.eye(n, dtype=stat_dtype)).abs().max())
            assert err < 10 * n * eps, (name, n, err / (n * eps))
        assert bool((f.lambda_ >= 0).all()) and float(f.lambda_.sum()) > 0


# ------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_mismatch(tmp_path, tiny_gpt2, tiny_batches):
    tracked = select_tracked_modules(tiny_gpt2, ["transformer.h.*.mlp.*"])
    factors = fit_ekfac(tiny_gpt2, tracked, lambda: tiny_batches, torch.float64, seed=0)
    fp = model_fingerprint(tiny_gpt2, tracked)
    assert len(fp) == 64 and fp == model_fingerprint(tiny_gpt2, tracked)
    meta = {"fingerprint": fp, "tracked_modules": list(tracked), "config_hash": "abc123"}
    out = tmp_path / "factors"
    save_factors(factors, out, meta)
    save_factors(factors, out, meta)  # overwriting an existing folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]  # no tmp/old folder left behind

    loaded = load_factors(out, expected=meta)
    assert loaded.names == factors.names
    assert (loaded.num_tokens, loaded.num_sequences, loaded.num_lambda_sequences) == (
        factors.num_tokens,
        factors.num_sequences,
        factors.num_lambda_sequences,
    )
    for name in factors.names:
        for field in ("q_a", "q_s", "eigval_a", "eigval_s", "lambda_"):
            assert torch.equal(getattr(loaded[name], field), getattr(factors[name], field))
    assert load_factors_meta(out)["ekfac"]["modules"]["transformer.h.0.mlp.c_fc"] == [64, 17]
    part = load_factors(out, names=["transformer.h.1.mlp.c_proj"])  # a stage loads only the modules it owns
    assert part.names == ["transformer.h.1.mlp.c_proj"]
    assert torch.equal(part["transformer.h.1.mlp.c_proj"].q_s, factors["transformer.h.1.mlp.c_proj"].q_s)

    # a changed model changes the fingerprint, and the loader names the field
    changed = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_proj.weight[0, 0] += 1e-3
    fp2 = model_fingerprint(changed, select_tracked_modules(changed, ["transformer.h.*.mlp.*"]))
    assert fp2 != fp
    with pytest.raises(DastraError, match=r"field 'fingerprint' is .*re-run `dastra fit`"):
        load_factors(out, expected={**meta, "fingerprint": fp2})
    with pytest.raises(DastraError, match=r"field 'tracked_modules' is .*re-run `dastra fit`"):
        load_factors(out, expected={**meta, "tracked_modules": ["transformer.h.0.mlp.c_fc"]})
    with pytest.raises(DastraError, match=r"field 'data_hash' is null"):
        load_factors(out, expected={"data_hash": "x"})
    # other tracked modules change the fingerprint too
    assert model_fingerprint(tiny_gpt2, select_tracked_modules(tiny_gpt2, ALL)) != fp


def test_missing_or_incomplete_factors_folder(tmp_path):
    with pytest.raises(DastraError, match=r"EK-FAC factors not found at .*run `dastra fit` first"):
        load_factors(tmp_path / "nope", expected={})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"fingerprint": "x"}))
    with pytest.raises(DastraError, match=r"unknown format: re-run `dastra fit`"):
        load_factors(tmp_path / "old")
    (tmp_path / "half").mkdir()
    description = {"format": 2, "modules": {"m": [2, 3]}, "files": {"m": "factors-00001.safetensors"}}
    (tmp_path / "half" / "meta.json").write_text(json.dumps({"fingerprint": "x", "ekfac": description}))
    with pytest.raises(DastraError, match=r"incomplete \(no factors-00001.safetensors\)"):
        load_factors(tmp_path / "half")


def test_fingerprint_samples_large_tensors():
    big = nn.Linear(2048, 1024)
    tracked = select_tracked_modules(nn.Sequential(big), ["0"])
    fp = model_fingerprint(nn.Sequential(big), tracked, max_elements=1 << 12)
    with torch.no_grad():
        big.weight.view(-1)[0] += 1.0  # element 0 is always in the strided sample
    assert model_fingerprint(nn.Sequential(big), tracked, max_elements=1 << 12) != fp


def test_covariance_stats_refuse_to_merge_different_modules(tiny_gpt2):
    t1 = select_tracked_modules(tiny_gpt2, ["transformer.h.0.mlp.c_fc"])
    t2 = select_tracked_modules(tiny_gpt2, ["transformer.h.1.mlp.c_fc"])
    with pytest.raises(DastraError, match="different modules"):
        CovarianceStats.zeros(t1, torch.float64) + CovarianceStats.zeros(t2, torch.float64)
