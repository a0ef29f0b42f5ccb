"""Replays one step of each stage on the `meta` device and measures its tensor memory and matmul FLOPs exactly.

A meta tensor has a shape and a dtype but no storage, so GPT-2 XL's forward and backward at the real micro-batch
run in a fraction of a second without a GPU or its weights. `LiveBytes` (a TorchDispatchMode) adds up the bytes of
every storage an operation creates and subtracts them when the storage is freed, so its `peak` is the high-water
mark of the memory the step allocates (the same number the CUDA caching allocator's `max_memory_allocated` reports,
minus its rounding). `torch.utils.flop_counter.FlopCounterMode` counts the matmul/attention FLOPs of the same replay.

Each `*_step` below mirrors, tensor for tensor, what the pipeline's stage does per batch (the functions it mirrors
are named in each docstring). They skip the data-dependent checks (NaN tests, label counts) a meta tensor cannot
answer; those allocate nothing that lives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from distributed_astra.config import ScoringConfig
from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.ihvp.products import GGNProduct, _loss_weights, softmax_ce_hessian, weighted_gradient_sum
from distributed_astra.ihvp.solvers import LIVE_VECTORS_PER_QUERY
from distributed_astra.models.lm import forward_logits, summed_token_loss
from distributed_astra.models.modules import TrackedModule
from distributed_astra.scoring.inner_products import module_scores, sequence_scores
from distributed_astra.scoring.low_rank import stored_like

META = torch.device("meta")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive: `live` now, `peak` at most."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the C++ StorageImpl: views share it, and meta storages have no data_ptr
        if key in self._alive:
            return
        self._alive.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


@dataclass(frozen=True)
class StepCost:
    """One replayed step: the peak of the bytes it allocated, and its FLOPs."""

    peak_bytes: int
    flops: int


def measure(step: Callable[[], None]) -> StepCost:
    """Run `step` under LiveBytes and FlopCounterMode; tensors it leaves alive at its end are freed afterwards."""
    live = LiveBytes()
    flops = FlopCounterMode(display=False)
    with flops, live:
        step()
    return StepCost(live.peak, int(flops.get_total_flops()))


def meta_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A full batch of `seq_len` real tokens per row, every token labelled (the worst case for memory)."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=META)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids)}


@contextmanager
def _captured(tracked: dict[str, TrackedModule]) -> Iterator[tuple[dict, dict]]:
    """Forward hooks keeping each tracked module's input and output, as `curvature.hooks.GradientCapture` does."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            outputs[name] = output

        return hook

    handles = [t.module.register_forward_hook(hook_for(name)) for name, t in tracked.items()]
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def _activation(x: torch.Tensor, tracked: TrackedModule, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ā in `dtype` with its bias column and padding mask (`GradientCapture.activation`)."""
    a = x.to(dtype)
    if tracked.has_bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a * mask[..., None].to(dtype)


def _output_grad(ds: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ds in `dtype`, zero at padding (`GradientCapture.output_grad`)."""
    return torch.where(mask[..., None] != 0, ds, torch.zeros((), dtype=ds.dtype, device=ds.device)).to(dtype)


def _forward_backward(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict[str, torch.Tensor], sample: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward, (sampled labels,) summed loss, one autograd.grad to the tracked outputs: (inputs, Ds)."""
    with torch.enable_grad(), _captured(tracked) as (inputs, outputs):
        logits = forward_logits(model, batch)
        if sample:  # `models.lm.sample_labels`: a float32 softmax and its cumulative sum over the vocabulary
            cdf = torch.softmax(logits[:, :-1].detach().float(), dim=-1).reshape(-1, logits.shape[-1]).cumsum_(-1)
            del cdf
        loss = summed_token_loss(logits, batch["labels"]).sum()
        names = list(outputs)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
        del logits, loss
    return inputs, {n: g for n, g in zip(names, grads)}


def _routed(pieces: list[torch.Tensor], name: str, owned: Collection[str], ranks: int) -> list[list[torch.Tensor]]:
    """`distributed.collectives.owner_route` on the busiest rank: an owned module's pieces arrive from every rank
    (this batch's shape on each), the others leave nothing."""
    return [[p.clone() for p in pieces] for _ in range(ranks)] if name in owned else []


def covariance_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, stat_dtype: torch.dtype, compute: torch.dtype,
    owned: Collection[str] | None = None, ranks: int = 1,
) -> None:
    """Pass 1 of the fit, one batch (`curvature.covariance.collect_covariances`), on the rank owning `owned`
    (default all) of `ranks`: every module captured, the A and S sums of its own modules from every rank's ā, Ds."""
    owned = list(tracked) if owned is None else owned
    a_sum = {n: torch.zeros(tracked[n].in_dim, tracked[n].in_dim, dtype=stat_dtype, device=META) for n in owned}
    s_sum = {n: torch.zeros(tracked[n].out_features, tracked[n].out_features, dtype=stat_dtype, device=META)
             for n in owned}
    inputs, grads = _forward_backward(model, tracked, batch, sample=True)
    mask = batch["attention_mask"]
    for name, t in tracked.items():
        local = [_activation(inputs[name], t, mask, compute).flatten(0, -2),
                 _output_grad(grads[name], mask, compute).flatten(0, -2)]
        for a, ds in _routed(local, name, owned, ranks):
            a_sum[name] += (a.T @ a).to(stat_dtype)
            s_sum[name] += (ds.T @ ds).to(stat_dtype)
            del a, ds
        del local


def eigen_step(tracked: dict[str, TrackedModule], stat_dtype: torch.dtype) -> None:
    """Eigendecomposition (`curvature.eigen.eigendecompose`) of the modules of `tracked` (a rank's own): every A
    and S sum stays while eigenbases accumulate."""
    sums = [torch.zeros(d, d, dtype=stat_dtype, device=META) for t in tracked.values() for d in (t.in_dim, t.out_features)]
    bases = []
    for matrix in sums:
        cov = matrix / 2.0
        sym = 0.5 * (cov + cov.T)
        bases.append(torch.linalg.eigh(sym))
        del cov, sym


def lambda_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, stat_dtype: torch.dtype, compute: torch.dtype,
    owned: Collection[str] | None = None, ranks: int = 1, chunk_elements: int = 1 << 25,
) -> None:
    """Pass 2 of the fit, one batch (`curvature.eigen.collect_eigenvalue_correction`), on the rank owning `owned`
    (default all) of `ranks`: its eigenbases and Λ sums, every rank's ā and Ds of its modules rotated there."""
    owned = list(tracked) if owned is None else owned
    q = {n: (torch.zeros(tracked[n].in_dim, tracked[n].in_dim, dtype=stat_dtype, device=META),
             torch.zeros(tracked[n].out_features, tracked[n].out_features, dtype=stat_dtype, device=META))
         for n in owned}
    lam = {n: torch.zeros(*tracked[n].shape, dtype=stat_dtype, device=META) for n in owned}
    inputs, grads = _forward_backward(model, tracked, batch, sample=True)
    mask = batch["attention_mask"]
    for name, t in tracked.items():
        local = [_activation(inputs[name], t, mask, compute), _output_grad(grads[name], mask, compute)]
        for a, ds in _routed(local, name, owned, ranks):
            q_a, q_s = q[name]
            ds_rot, a_rot = ds @ q_s.to(compute), a @ q_a.to(compute)
            del a, ds
            total = torch.zeros(*t.shape, dtype=compute, device=META)
            step = max(1, chunk_elements // max(1, t.shape[0] * t.shape[1]))
            for start in range(0, ds_rot.shape[0], step):
                g = sequence_gradients(ds_rot[start : start + step], a_rot[start : start + step])
                total += (g * g).sum(dim=0)
                del g
            lam[name] += total.to(stat_dtype)
            del ds_rot, a_rot, total
        del local


def query_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, stat_dtype: torch.dtype, num_queries: int,
    owned: Collection[str] | None = None, state_dtype: torch.dtype | None = None,
) -> None:
    """Query gradients (`stages.query.rank_query`): one batch, every module captured, every query's gradient of
    the `owned` modules (default all) formed in `stat_dtype` and kept in `state_dtype` (default the same)."""
    owned = list(tracked) if owned is None else owned
    kept = [torch.zeros(num_queries, *tracked[n].shape, dtype=state_dtype or stat_dtype, device=META) for n in owned]
    inputs, grads = _forward_backward(model, tracked, batch, sample=False)
    mask = batch["attention_mask"]
    per_sequence = {
        n: sequence_gradients(_output_grad(grads[n], mask, stat_dtype),
                              _activation(inputs[n], tracked[n], mask, stat_dtype))
        for n in owned
    }
    del per_sequence, inputs, grads, kept




def astra_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, stat_dtype: torch.dtype, num_queries: int,
    max_tangent_elements: int, owned: Collection[str] | None = None, state_dtype: torch.dtype | None = None,
) -> None:
    """One ASTRA iteration on a chunk of `num_queries` queries: the solver's vectors (in `state_dtype`, default
    `stat_dtype`) and the EK-FAC factors of the `owned` modules (default all; `ray.solve_mode=modules` gives a rank
    its own), and the exact GGN product (`ihvp.products.GGNProduct.product_sum`, double-VJP) with tangents on those
    modules. FLOPs: the set-up and at most two tangent chunks are replayed (`astra_flops` scales them)."""
    names = list(tracked) if owned is None else list(owned)
    factors = [
        torch.zeros(d, d, dtype=stat_dtype, device=META) for n in names for d in (tracked[n].in_dim, tracked[n].out_features)
    ] + [torch.zeros(*tracked[n].shape, dtype=stat_dtype, device=META) for n in names]
    vectors = [
        torch.zeros(num_queries, *tracked[n].shape, dtype=state_dtype or stat_dtype, device=META)
        for _ in range(LIVE_VECTORS_PER_QUERY) for n in names
    ]
    ggn = GGNProduct(model, tracked, max_tangent_elements=max_tangent_elements)
    model_dtype = next(iter(model.parameters())).dtype
    leaves = [tracked[n].weight_matrix().requires_grad_(True) for n in names]
    with torch.enable_grad():
        logits = ggn._logits(dict(zip(names, leaves)), batch)
        dummy = torch.zeros_like(logits, requires_grad=True)
        jt_dummy = torch.autograd.grad(logits, leaves, grad_outputs=dummy, create_graph=True)
    h_dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.detach().to(h_dtype), dim=-1)
    weighted_probs = probs * _loss_weights(batch, logits.shape, h_dtype)[..., None]
    chunk = max(1, max_tangent_elements // max(1, logits.numel()))
    results = []
    for index, start in enumerate(range(0, num_queries, chunk)):
        size = min(chunk, num_queries - start)
        if index >= 2:  # every chunk allocates alike: later ones are represented by their results only
            results.append([torch.zeros(size, *tracked[n].shape, dtype=stat_dtype, device=META) for n in names])
            continue
        v_chunk = [v[start : start + size].to(model_dtype) for v in vectors[: len(names)]]
        jv = torch.autograd.grad(jt_dummy, dummy, grad_outputs=v_chunk, retain_graph=True, is_grads_batched=True)[0]
        hjv = softmax_ce_hessian(probs, jv.to(h_dtype), weighted_probs).to(logits.dtype)
        del jv
        out = torch.autograd.grad(logits, leaves, grad_outputs=hjv, retain_graph=True, is_grads_batched=True)
        results.append([t.to(stat_dtype) for t in out])
        del hjv, out, v_chunk
    del logits, jt_dummy, dummy, probs, weighted_probs
    total = [torch.cat([r[i] for r in results]) for i in range(len(names))]
    del results
    product = [t / 2.0 for t in total]  # G̃x = the sum over the minibatch / N_B
    del total, product, factors


def fisher_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, stat_dtype: torch.dtype, compute: torch.dtype,
    num_queries: int, owned: Collection[str] | None = None, state_dtype: torch.dtype | None = None,
) -> None:
    """One iteration with the hook-only Fisher product (`ihvp.products.FisherProduct.product_sum`, one label
    sample): the solver's vectors (in `state_dtype`, default `stat_dtype`) and factors of the `owned` modules
    (default all), a forward/backward capturing every module, the per-sequence coefficients and the weighted
    gradient sums of the owned ones."""
    names = list(tracked) if owned is None else list(owned)
    factors = [
        torch.zeros(d, d, dtype=stat_dtype, device=META) for n in names for d in (tracked[n].in_dim, tracked[n].out_features)
    ] + [torch.zeros(*tracked[n].shape, dtype=stat_dtype, device=META) for n in names]
    vectors = {n: torch.zeros(num_queries, *tracked[n].shape, dtype=state_dtype or stat_dtype, device=META)
               for n in names}
    others = [torch.zeros_like(v) for _ in range(LIVE_VECTORS_PER_QUERY - 1) for v in vectors.values()]
    v = {n: t.to(compute) for n, t in vectors.items()}
    total = {n: torch.zeros_like(t) for n, t in v.items()}
    inputs, grads = _forward_backward(model, tracked, batch, sample=True)
    mask = batch["attention_mask"]
    ds = {n: _output_grad(grads[n], mask, compute) for n in names}
    abar = {n: _activation(inputs[n], tracked[n], mask, compute) for n in names}
    del inputs, grads
    coeff = sequence_scores(ds, abar, v)
    for n in names:
        total[n] += weighted_gradient_sum(ds[n], abar[n], coeff)
    del ds, abar, coeff
    result = {n: (t / 1.0).to(stat_dtype) for n, t in total.items()}
    del result, total, others, factors


def ekfac_apply_flops(tracked: dict[str, TrackedModule], num_queries: int) -> int:
    """FLOPs of one (P + λI)⁻¹ on Q directions (`ihvp.ekfac.ekfac_matrix_function`): four matmuls per module."""
    return sum(4 * num_queries * t.shape[0] * t.shape[1] * (t.shape[0] + t.shape[1]) for t in tracked.values())


def score_step(
    model: nn.Module, tracked: dict[str, TrackedModule], batch: dict, compute: torch.dtype, num_queries: int,
    scoring: ScoringConfig, owned: Collection[str] | None = None, world_size: int = 1,
) -> None:
    """Scoring, one step (stages/score.py: `captured_batches` + `step_scores`): the directions of the `owned`
    modules (default all) as `scoring.low_rank.stored_direction` holds them, this rank's batch forwarded and
    backwarded capturing every module, and, per owned module, the ā and Ds of the `world_size` ranks' batches
    (`owner_route`) scored against its directions into the step's partial scores."""
    names = list(tracked) if owned is None else list(owned)
    directions = {n: stored_like(num_queries, tracked[n].shape, scoring, compute, META) for n in names}
    inputs, grads = _forward_backward(model, tracked, batch, sample=False)
    mask = batch["attention_mask"]
    activations = {n: _activation(inputs[n], t, mask, compute) for n, t in tracked.items()}
    output_grads = {n: _output_grad(grads[n], mask, compute) for n in tracked}
    del inputs, grads
    rows = batch["input_ids"].shape[0]
    partial = torch.zeros(world_size * rows, num_queries, dtype=compute, device=META)
    for n in names:
        received = [(output_grads[n], activations[n])] + [
            (output_grads[n].clone(), activations[n].clone()) for _ in range(world_size - 1)
        ]
        for r, (ds, a) in enumerate(received):
            partial[r * rows : (r + 1) * rows] += module_scores(ds, a, directions[n])
        del received
