"""Pass 1 of the EK-FAC fit: the uncentered Kronecker factors A = E[ā āᵀ] and S = E[Ds Dsᵀ] (seeds §3).

What the loss is comes from a `task.Task` (default: `CAUSAL_LM`): its `sampled_loss` draws targets from the model's
own predictive distribution (true Fisher = GGN, seeds §2), and the loss is summed over examples, so Ds_t is the
gradient of the sampled example loss with respect to the module output at position t. For the causal LM, labels
are sampled one per predicted token and a sequence's loss is the sum over its tokens.

Token set of the causal LM (used for A, S and `num_tokens` alike): every position with attention_mask == 1. This is kronfluence's
convention and docs/design.md's ("padding positions have ā = 0 and do not count as tokens"). Positions without a
label of their own are kept on purpose: for attention and for every layer below it, an unlabelled position (a
masked prompt, the last token) still feeds later positions' losses, so its Ds is not zero and its ā Ds pair is part
of the sequence gradient Σ_t Ds_t ā_tᵀ. Only positions whose Ds is exactly zero (e.g. the last real token) add to
A without adding to S. A and S are normalised by the same count (`Task.num_positions`; one per example for the
supervised tasks).

Everything here is a SUM with counts, mergeable with `+` (and all-reducible tensor by tensor), so that shards of
the data can be processed anywhere and combined before normalising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from distributed_astra.curvature.hooks import GradientCapture
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule
from distributed_astra.task import CAUSAL_LM, Task

OnBatch = Callable[[int], None]
Route = Callable[[str, list[torch.Tensor]], list[list[torch.Tensor]]]
"""route(module, this rank's tensors of it for one batch) -> the pieces this rank accumulates for that module. The
default, `local_route`, keeps its own; under module ownership (distributed.collectives.owner_route) the owner gets
every rank's and the other ranks none. Called for every tracked module of every batch, in model order."""


def local_route(name: str, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [tensors]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


STAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # factors.dtype: statistics, whatever the model


def product_dtype(model: nn.Module, stat_dtype: torch.dtype) -> torch.dtype:
    """The dtype of one batch's products (ā āᵀ, Ds Dsᵀ, rotated gradients): float64 only when both the model and
    the statistics are float64, float32 otherwise (bf16/fp16 models included). Sums across batches always
    accumulate in `stat_dtype` (docs/design.md, "EK-FAC"): a batch's float32 sum is accurate to ~1e-6 relative,
    and float64 products of float32 activations cost 2-4x on CPU without adding information."""
    model_dtype = next(iter(model.parameters()), torch.empty(0)).dtype
    return torch.float64 if stat_dtype == torch.float64 and model_dtype == torch.float64 else torch.float32


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def sampled_fisher_capture(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype,
    generator: torch.Generator | None,
    *,
    task: Task = CAUSAL_LM,
) -> tuple[GradientCapture, torch.Tensor | None]:
    """One forward, targets drawn from the model, one backward of Σ_n `task.sampled_loss`: (capture, mask).

    `batch` must already be on the model's device. The returned capture holds ā and Ds of every tracked module;
    mask is the task's attention mask (None: every position is real).
    """
    task.check_batch(batch)
    mask = task.attention_mask(batch)
    with torch.enable_grad(), GradientCapture(tracked, mask, dtype) as capture:
        loss = task.sampled_loss(task.output(model, batch), batch, generator).sum()
        capture.backward(loss)
    return capture, mask


@dataclass
class CovarianceStats:
    """Σ ā āᵀ and Σ Ds Dsᵀ per module over `num_tokens` positions drawn from `num_sequences` sequences (examples)."""

    a_sum: dict[str, torch.Tensor]  # [in+1, in+1]
    s_sum: dict[str, torch.Tensor]  # [out, out]
    num_tokens: int
    num_sequences: int

    @classmethod
    def zeros(
        cls, tracked: dict[str, TrackedModule], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> CovarianceStats:
        return cls(
            {n: torch.zeros(t.in_dim, t.in_dim, dtype=dtype, device=device) for n, t in tracked.items()},
            {n: torch.zeros(t.out_features, t.out_features, dtype=dtype, device=device) for n, t in tracked.items()},
            0,
            0,
        )

    def __add__(self, other: CovarianceStats) -> CovarianceStats:
        if set(self.a_sum) != set(other.a_sum):
            differ = sorted(set(self.a_sum) ^ set(other.a_sum))
            raise DastraError(f"cannot merge covariance statistics over different modules: {differ}")
        return CovarianceStats(
            {n: self.a_sum[n] + other.a_sum[n].to(self.a_sum[n].device) for n in self.a_sum},
            {n: self.s_sum[n] + other.s_sum[n].to(self.s_sum[n].device) for n in self.s_sum},
            self.num_tokens + other.num_tokens,
            self.num_sequences + other.num_sequences,
        )

    def _check_count(self) -> None:
        if self.num_tokens <= 0:
            raise DastraError("the covariance pass saw no tokens: the corpus (or this shard) is empty")

    def covariance_a(self, name: str) -> torch.Tensor:
        """A = Σ ā āᵀ / num_tokens."""
        self._check_count()
        return self.a_sum[name] / self.num_tokens

    def covariance_s(self, name: str) -> torch.Tensor:
        """S = Σ Ds Dsᵀ / num_tokens."""
        self._check_count()
        return self.s_sum[name] / self.num_tokens

    def to(self, device: torch.device | str) -> CovarianceStats:
        return CovarianceStats(
            {n: t.to(device) for n, t in self.a_sum.items()},
            {n: t.to(device) for n, t in self.s_sum.items()},
            self.num_tokens,
            self.num_sequences,
        )


def collect_covariances(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    on_batch: OnBatch | None = None,
    *,
    task: Task = CAUSAL_LM,
    owned: Iterable[str] | None = None,
    route: Route = local_route,
) -> CovarianceStats:
    """Accumulate A and S sums over `batches` (targets sampled with `generator` by `task.sampled_loss`).

    `on_batch(n)` is called after each batch with its number of rows n (progress reporting). `num_tokens` counts
    `task.num_positions`, `num_sequences` only the rows that carry a loss (`task.num_examples`).

    Every module of `tracked` is hooked and routed; sums are kept for the `owned` ones (default: all), from the
    pieces `route` hands this rank (ā and Ds flattened over positions).

    The generator must live on the model's device (torch.multinomial's requirement).
    """
    device = model_device(model)
    keep = set(tracked if owned is None else owned)
    stats = CovarianceStats.zeros({n: t for n, t in tracked.items() if n in keep}, dtype, device)
    compute = product_dtype(model, dtype)
    for batch in batches:
        batch = batch_to_device(batch, device)
        capture, _ = sampled_fisher_capture(model, tracked, batch, compute, generator, task=task)
        for name in tracked:  # ā and Ds are zero at padding, so padded rows add nothing
            pieces = route(name, [capture.activation(name).flatten(0, -2), capture.output_grad(name).flatten(0, -2)])
            for a, ds in pieces if name in keep else ():
                stats.a_sum[name] += (a.T @ a).to(dtype)
                stats.s_sum[name] += (ds.T @ ds).to(dtype)
        stats.num_tokens += task.num_positions(batch)
        stats.num_sequences += task.num_examples(batch)
        del capture
        if on_batch is not None:
            on_batch(task.num_rows(batch))
    return stats
