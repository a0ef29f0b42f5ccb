"""Curvature-vector products G̃_B·v on a minibatch, and the arithmetic on direction dicts (seeds §2, footnote 6).

Vectors ("directions") are dicts `{module name: Tensor[Q, out, in+1]}` over the tracked modules, in the layout of
query gradients and of `ekfac_inverse` (bias last), batched over Q queries. The helpers `vec_*` below are the only
place that does arithmetic on them.

For a minibatch B, both products return

    G̃_B v = (1/N_B) Σ_{n ∈ B} J_nᵀ H_n J_n v

restricted to the tracked parameters (every other parameter held fixed), where N_B is the number of sequences of
the batch that carry a loss (`Task.num_examples`), J_n the Jacobian of sequence n's output z_n and H_n the task's
output Hessian (`Task.output_hessian`, seeds §2 Eq 12). For the causal LM (`task.CAUSAL_LM`, the default) H_n is
the softmax-CE Hessian summed over the sequence's labelled positions, H u = p ⊙ u − p (pᵀu) per token; for
`task.RegressionTask` it is the identity. This is the scale of EK-FAC's Λ (per sequence, summed over tokens;
docs/design.md), so (P + λI)⁻¹ and (G̃ + λI) are consistent.

* `GGNProduct`: exact, with `torch.func.functional_call` (tracked weights replaced by the [out, in+1] matrices).
  J v by the double-VJP trick (the default, measured 1.5x cheaper than forward-mode here) or by forward-mode AD,
  then H, then Jᵀ.
* `FisherProduct`: the true Fisher with targets sampled from the model, from module hooks and an ordinary
  forward/backward only: what runs where parameters are sharded (ZeRO-3). Unbiased but noisy (E = GGN).

Both expose `product_sum(v, batch) -> (Σ_n J_nᵀ H_n J_n v, N_B)` so a distributed caller can all-reduce the sums and
the counts before dividing; `product(v, batch)` is that sum divided by N_B.

Under module ownership (stages/solve.py, mode `modules`) each rank holds v only for its `owned` modules and every
rank runs the same minibatch: both products split at a quantity that is a SUM over modules, the LM-output tangent
J v = Σ_l J_l v_l (GGN) or the per-sequence coefficient c_n = Σ_l ⟨DW̄_{n,l}, V_l⟩ (Fisher), let `combine` sum
it over the ranks (an all-reduce; the identity on one rank) and return the owned modules' blocks of the full product.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from distributed_astra.curvature.covariance import (
    batch_to_device,
    model_device,
    product_dtype,
    sampled_fisher_capture,
)
from distributed_astra.curvature.hooks import sequence_gradients
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule
from distributed_astra.scoring.inner_products import materialise_per_sequence, sequence_scores
from distributed_astra.task import (  # noqa: F401  (_loss_weights, softmax_ce_hessian: re-exported for plan/simulate.py)
    CAUSAL_LM,
    Task,
    _loss_weights,
    softmax_ce_hessian,
)

Vectors = dict[str, torch.Tensor]
Batch = Mapping[str, torch.Tensor]

# Largest number of logit-tangent elements (Q_chunk · B · T · V) materialised at once by GGNProduct.
DEFAULT_TANGENT_ELEMENTS = 1 << 25
# Largest number of elements of per-sequence gradients / weighted output gradients materialised by FisherProduct.
_FISHER_CHUNK_ELEMENTS = 1 << 25


# ============================================================================================ vector helpers
def on_this_rank(t: torch.Tensor) -> torch.Tensor:
    """The identity: a sum over modules complete on this rank (the `combine` / `Sharding.reduce` of one rank
    holding every module)."""
    return t


def vec_nbytes(*xs: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors of every dict in `xs` (what a rank holds: its query gradients, iterates)."""
    return sum(t.numel() * t.element_size() for x in xs for t in x.values())


def vec_num_queries(x: Vectors) -> int:
    """Q, the leading dimension shared by every module's tensor."""
    sizes = {t.shape[0] for t in x.values()}
    if len(sizes) != 1:
        raise DastraError(f"direction tensors disagree on the number of queries: {sorted(sizes)}")
    return sizes.pop()


def _per_query(alpha: float | torch.Tensor, t: torch.Tensor) -> float | torch.Tensor:
    """A scalar as is, or a [Q] tensor reshaped to broadcast over [Q, out, in+1]."""
    if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
        return alpha.to(device=t.device, dtype=t.dtype).view(-1, *([1] * (t.dim() - 1)))
    return alpha


def vec_dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """Per-query inner products Σ_modules ⟨x_q, y_q⟩: Tensor[Q] (in x's dtype)."""
    total = None
    for name, t in x.items():
        d = (t * y[name].to(t.dtype)).flatten(1).sum(dim=1)
        total = d if total is None else total + d
    return total


def vec_norm(x: Vectors) -> torch.Tensor:
    """Per-query Euclidean norms: Tensor[Q]."""
    return vec_dot(x, x).clamp_min(0).sqrt()


def vec_axpy(alpha: float | torch.Tensor, x: Vectors, y: Vectors) -> Vectors:
    """alpha·x + y (a new dict); alpha is a scalar or a per-query Tensor[Q]."""
    return {name: _per_query(alpha, t) * t + y[name].to(t.dtype) for name, t in x.items()}


def vec_scale(alpha: float | torch.Tensor, x: Vectors) -> Vectors:
    """alpha·x; alpha is a scalar or a per-query Tensor[Q]."""
    return {name: _per_query(alpha, t) * t for name, t in x.items()}


def vec_add(x: Vectors, y: Vectors) -> Vectors:
    return {name: t + y[name].to(t.dtype) for name, t in x.items()}


def vec_sub(x: Vectors, y: Vectors) -> Vectors:
    return {name: t - y[name].to(t.dtype) for name, t in x.items()}


def vec_zeros_like(x: Vectors) -> Vectors:
    return {name: torch.zeros_like(t) for name, t in x.items()}


def vec_clone(x: Vectors) -> Vectors:
    return {name: t.clone() for name, t in x.items()}


def vec_to(x: Vectors, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Vectors:
    return {name: t.to(device=device, dtype=dtype) for name, t in x.items()}


def vec_take(x: Vectors, index: torch.Tensor) -> Vectors:
    """The queries `index` (a LongTensor) of every module: a new dict of [len(index), out, in+1]."""
    return {name: t.index_select(0, index.to(t.device)) for name, t in x.items()}


def vec_put(x: Vectors, index: torch.Tensor, values: Vectors) -> None:
    """In place: x[name][index] = values[name] for every module."""
    for name, t in x.items():
        t.index_copy_(0, index.to(t.device), values[name].to(t.dtype))


def vec_isfinite(x: Vectors) -> torch.Tensor:
    """Tensor[Q] bool: every entry of query q is finite."""
    ok = None
    for t in x.values():
        f = torch.isfinite(t).flatten(1).all(dim=1)
        ok = f if ok is None else ok & f
    return ok


def check_vectors(x: Vectors, tracked: Mapping[str, TrackedModule]) -> int:
    """Q, after checking that x holds exactly the tracked modules in the [Q, out, in+1] layout."""
    if set(x) != set(tracked):
        missing, extra = sorted(set(tracked) - set(x)), sorted(set(x) - set(tracked))
        raise DastraError(
            f"directions do not match the tracked modules (missing {missing}, unexpected {extra}): "
            "use the query gradients of the same model.tracked_modules"
        )
    for name, t in x.items():
        shape = tracked[name].shape
        if t.dim() != 3 or tuple(t.shape[1:]) != shape:
            raise DastraError(
                f"direction of module '{name}' has shape {tuple(t.shape)}, expected [Q, {shape[0]}, {shape[1]}] "
                "([Q, out, in+1] layout)"
            )
    return vec_num_queries(x)


# ============================================================================================ products
class CurvatureProduct(ABC):
    """G̃_B·v for a minibatch B, on the tracked modules: see the module docstring for the exact definition."""

    tracked: dict[str, TrackedModule]
    owned: list[str]  # the modules whose blocks v holds and the product returns (all of `tracked` on one rank)

    @abstractmethod
    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        """(Σ_{n ∈ B} J_nᵀ H_n J_n v, N_B): the un-normalised product and the number of loss-carrying sequences."""

    def product(self, vectors: Vectors, batch: Batch) -> Vectors:
        """G̃_B v = product_sum / N_B, in the dtype and on the device of `vectors` ([Q, out, in+1] per module)."""
        total, count = self.product_sum(vectors, batch)
        if count <= 0:
            raise DastraError(
                "a curvature minibatch has no sequence carrying a loss (every label is -100): "
                "sample minibatches from sequences with at least two real tokens (MinibatchSampler does)"
            )
        return {name: t / count for name, t in total.items()}

    __call__ = product


def batch_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch: every tensor whose first dimension is the batch's rows is cut, the rest kept."""
    rows = int(batch["input_ids"].shape[0])
    return {k: (t[start:stop] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == rows else t)
            for k, t in batch.items()}


class MicroBatchedProduct(CurvatureProduct):
    """`inner`'s product_sum over a minibatch as the sum over consecutive micro-batches of at most `rows` rows.

    Σ_{n ∈ B} J_nᵀ H_n J_n v is a sum over sequences, so any row split gives the same product (up to summation
    order) while only one micro-batch's activations live at a time. `inner` must be a one-sample product; the
    `label_samples` repeats run sample after sample over the micro-batches in order, which draws the Fisher labels
    in the order `FisherProduct(num_samples=label_samples)` draws them on the whole minibatch.
    """

    def __init__(self, inner: CurvatureProduct, rows: int, label_samples: int = 1) -> None:
        if rows < 1:
            raise DastraError(f"solver.micro_batch_size must be >= 1, got {rows}")
        self.inner = inner
        self.tracked = inner.tracked
        self.owned = inner.owned
        self.generator = getattr(inner, "generator", None)  # the label stream the held-out evaluation pins
        self.rows = int(rows)
        self.label_samples = int(label_samples)

    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        total_rows = int(batch["input_ids"].shape[0])
        total: Vectors | None = None
        count = 0
        for _ in range(self.label_samples):
            count = 0
            for start in range(0, total_rows, self.rows):
                partial, n = self.inner.product_sum(vectors, batch_rows(batch, start, min(start + self.rows,
                                                                                          total_rows)))
                count += n
                if total is None:
                    total = partial
                else:
                    for name, t in partial.items():
                        total[name] += t
        return {n: t / self.label_samples for n, t in total.items()}, count


class _TaskOutput(nn.Module):
    """`task.output(model, batch)` as a module of its own, so that `functional_call` can swap the model's weights."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.task.output(self.model, batch)


class GGNProduct(CurvatureProduct):
    """Exact minibatch GGN·v by `functional_call` (torch.func), for replicated models (not ZeRO-3 partitioned).

    Per minibatch, one forward builds the output z(W̄) = `task.output` (logits for the LM) with the tracked weights
    replaced by leaf [out, in+1] matrices (`TrackedModule.to_parameter_layout`, which transposes for Conv1D), plus
    Jᵀu (u a dummy output cotangent) with `create_graph=True`. Then for every chunk of queries, batched with
    `is_grads_batched` (vmap):

        J v   = ∂⟨Jᵀu, v⟩/∂u     ("vjp": the double-VJP trick, reusing the graph; default)
              or forward-mode AD  ("jvp": one dual forward per query; the HF input-grad hook rules out torch.func.jvp)
        H J v   `task.output_hessian` (float32 at least); for the LM, weights 1 on labelled positions
        Jᵀ H J v   one batched backward through the saved graph

    `max_tangent_elements` bounds Q_chunk·(elements of z), the size of one output tangent block (Q_chunk·B·T·V).

    Measured on this project's CPU (tiny GPT-2: V 4096, 2 layers, width 128, T 64, B 16, float32, 1 thread): the
    set-up (forward + Jᵀu graph) costs about one forward+backward, then each query about 1.3x a forward+backward
    with "vjp" against 2.1x with "jvp". The tiny model is dominated by elementwise work (GELU's backward graph, the
    V-wide output Hessian); matmul-heavy large models should be cheaper per query relative to a forward+backward.
    """

    def __init__(
        self,
        model: nn.Module,
        tracked: dict[str, TrackedModule],
        jv_mode: str = "vjp",
        max_tangent_elements: int = DEFAULT_TANGENT_ELEMENTS,
        *,
        task: Task = CAUSAL_LM,
        owned: list[str] | None = None,
        combine: Callable[[torch.Tensor], torch.Tensor] = on_this_rank,
    ) -> None:
        if jv_mode not in ("vjp", "jvp"):
            raise DastraError(f"GGNProduct jv_mode '{jv_mode}' is not one of: vjp, jvp")
        if owned is not None and jv_mode != "vjp":
            raise DastraError("GGNProduct with owned modules computes J v by the double-VJP trick: use jv_mode vjp")
        self.model = model
        self.tracked = tracked
        self.owned = list(tracked) if owned is None else list(owned)
        self.combine = combine
        self.task = task
        self._output = _TaskOutput(task, model)
        self.jv_mode = jv_mode
        self.max_tangent_elements = int(max_tangent_elements)
        if model.training:
            raise DastraError("GGNProduct needs the model in eval() mode (dropout makes G asymmetric)")

    # ------------------------------------------------------------------ pieces
    def _param_dict(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = {}
        for name, matrix in matrices.items():
            for key, t in self.tracked[name].to_parameter_layout(matrix).items():
                params[f"model.{name}.{key}"] = t
        return params

    def _logits(self, matrices: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The task's output z (the LM's logits) with the tracked weights replaced by `matrices`."""
        return functional_call(
            self._output,
            self._param_dict(matrices),
            args=(batch,),
            # a tracked module's parameters are those of ITS use only (as for the hooks): tracking a tied lm_head
            # must not also perturb the input embedding
            tie_weights=False,
        )

    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        num_queries = check_vectors(vectors, {n: self.tracked[n] for n in self.owned})
        device = model_device(self.model)
        batch = batch_to_device(dict(batch), device)
        count = self.task.num_examples(batch)
        names = list(self.tracked)
        model_dtype = next(iter(self.model.parameters())).dtype
        out_dtype = next(iter(vectors.values())).dtype
        leaves = [self.tracked[n].weight_matrix().to(device).requires_grad_(True) for n in names]
        matrices = dict(zip(names, leaves))
        with torch.enable_grad():
            logits = self._logits(matrices, batch)
            dummy = None
            jt_dummy = None
            if self.jv_mode == "vjp":
                dummy = torch.zeros_like(logits, requires_grad=True)
                jt_dummy = torch.autograd.grad(logits, leaves, grad_outputs=dummy, create_graph=True)
        hessian = self.task.output_hessian(logits.detach(), batch)

        per_query = logits.numel()
        chunk = max(1, self.max_tangent_elements // max(1, per_query))
        mine = [names.index(n) for n in self.owned]
        results: dict[str, list[torch.Tensor]] = {n: [] for n in self.owned}
        for start in range(0, num_queries, chunk):
            v_chunk = [vectors[names[i]][start : start + chunk].to(device=device, dtype=model_dtype) for i in mine]
            if self.jv_mode == "vjp":
                jv = torch.autograd.grad(
                    [jt_dummy[i] for i in mine], dummy, grad_outputs=v_chunk, retain_graph=True, is_grads_batched=True
                )[0]
            else:
                jv = torch.stack([self._forward_jv(names, leaves, [v[q] for v in v_chunk], batch)
                                  for q in range(v_chunk[0].shape[0])])
            hjv = hessian(self.combine(jv)).to(logits.dtype)  # J v = Σ over every rank's modules
            del jv
            out = torch.autograd.grad(
                logits, [leaves[i] for i in mine], grad_outputs=hjv, retain_graph=True, is_grads_batched=True
            )
            for n, t in zip(self.owned, out):
                results[n].append(t.to(out_dtype))
        del logits, jt_dummy, dummy
        target = next(iter(vectors.values())).device
        return {n: torch.cat(results[n]).to(target) for n in self.owned}, count

    def _forward_jv(self, names, leaves, tangents, batch) -> torch.Tensor:
        """J v for one direction by forward-mode AD (dual tensors; no torch.func, so module hooks may touch grads)."""
        with torch.no_grad(), forward_ad.dual_level():
            duals = {n: forward_ad.make_dual(p.detach(), t) for n, p, t in zip(names, leaves, tangents)}
            return forward_ad.unpack_dual(self._logits(duals, batch)).tangent


def label_generator(model: nn.Module, seed: int) -> torch.Generator:
    """The generator of FisherProduct's sampled targets: on the model's device (where `sample_labels` draws), seeded
    apart from the CPU generator of the minibatch indices so that the two streams never interleave."""
    return torch.Generator(device=model_device(model)).manual_seed(seed + 1)


class FisherProduct(CurvatureProduct):
    """Sampled-label (true) Fisher·v from module hooks and an ordinary forward/backward: ZeRO-3 compatible.

    Per label sample s (targets drawn from the model by `task.sampled_loss`: for the LM one label per predicted
    token, with `generator`), one forward and one `autograd.grad` of the summed loss give ā and Ds of every tracked
    module; then

        c_{n,q} = Σ_l Σ_t Ds_{n,t}ᵀ V_{q,l} ā_{n,t}            (scoring.inner_products.sequence_scores)
        G̃ v_q  += Σ_n c_{n,q} DW̄_n,   DW̄_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ

    and the sum is divided by num_samples (and by N_B in `product`). E_labels[DW̄_n DW̄_nᵀ] = J_nᵀ H_n J_n
    (seeds §2, `Task.sampled_loss`), so the product is unbiased for the GGN product; its noise falls as 1/sqrt(num_samples).
    No weight is read and no parameter gradient is formed. Products run in `product_dtype(model, vectors' dtype)`.
    """

    def __init__(
        self,
        model: nn.Module,
        tracked: dict[str, TrackedModule],
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        task: Task = CAUSAL_LM,
        owned: list[str] | None = None,
        combine: Callable[[torch.Tensor], torch.Tensor] = on_this_rank,
    ) -> None:
        if num_samples < 1:
            raise DastraError(f"FisherProduct num_samples must be >= 1, got {num_samples}")
        self.model = model
        self.tracked = tracked
        self.owned = list(tracked) if owned is None else list(owned)
        self.combine = combine
        self.task = task
        self.num_samples = int(num_samples)
        self.generator = generator

    def product_sum(self, vectors: Vectors, batch: Batch) -> tuple[Vectors, int]:
        check_vectors(vectors, {n: self.tracked[n] for n in self.owned})
        device = model_device(self.model)
        batch = batch_to_device(dict(batch), device)
        count = self.task.num_examples(batch)
        out_dtype = next(iter(vectors.values())).dtype
        target = next(iter(vectors.values())).device
        compute = product_dtype(self.model, out_dtype)
        v = vec_to(vectors, device=device, dtype=compute)
        total = vec_zeros_like(v)
        for _ in range(self.num_samples):
            capture, _mask = sampled_fisher_capture(
                self.model, self.tracked, batch, compute, self.generator, task=self.task
            )
            ds = {n: capture.output_grad(n) for n in self.owned}
            abar = {n: capture.activation(n) for n in self.owned}
            coeff = self.combine(sequence_scores(ds, abar, v))  # [B, Q], summed over every rank's modules
            for n in self.owned:
                total[n] += weighted_gradient_sum(ds[n], abar[n], coeff)
            del capture, ds, abar
        return {n: (t / self.num_samples).to(device=target, dtype=out_dtype) for n, t in total.items()}, count


def weighted_gradient_sum(ds: torch.Tensor, abar: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """[Q, O, I] = Σ_n coeff[n, q] Σ_t Ds_{n,t} ā_{n,t}ᵀ from Ds [B,T,O], ā [B,T,I], coeff [B,Q].

    Either through the per-sequence gradients (B·T·O·I + B·Q·O·I multiply-adds) or per token
    (Q·B·T·O·I, no O×I per sequence), whichever is cheaper; chunked over sequences to bound memory.
    """
    batch, tokens, out_dim = ds.shape
    in_dim = abar.shape[-1]
    num_queries = coeff.shape[1]
    result = ds.new_zeros(num_queries, out_dim, in_dim)
    if materialise_per_sequence(batch, tokens, out_dim, in_dim, num_queries):
        step = max(1, _FISHER_CHUNK_ELEMENTS // max(1, out_dim * in_dim))
        flat = result.view(num_queries, -1)
        for s in range(0, batch, step):  # one matmul: torch's einsum of it can be several times slower
            grads = sequence_gradients(ds[s : s + step], abar[s : s + step])
            flat += coeff[s : s + step].T @ grads.reshape(len(grads), -1)
    else:
        step = max(1, _FISHER_CHUNK_ELEMENTS // max(1, num_queries * tokens * out_dim))
        for s in range(0, batch, step):
            weighted = torch.einsum("bq,bto->qbto", coeff[s : s + step], ds[s : s + step])
            a = abar[s : s + step].reshape(-1, in_dim)
            result += weighted.reshape(num_queries, -1, out_dim).transpose(1, 2) @ a
    return result
