"""Per-sequence gradients of the summed token loss for the tracked modules, from hooks (no weight gradients)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from distributed_astra.curvature.hooks import GradientCapture
from distributed_astra.models.lm import forward_logits, summed_token_loss
from distributed_astra.models.modules import TrackedModule


def captured_batches(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> Iterator[tuple[dict[str, torch.Tensor], GradientCapture]]:
    """For each batch, run forward and backward of Σ_sequences Σ_tokens loss and yield (batch, capture).

    The loss uses the batch's own labels, so prompt tokens of a query (label -100) carry no loss (seeds §1).
    """
    for batch in batches:
        with GradientCapture(tracked, batch["attention_mask"], dtype) as capture:
            loss = summed_token_loss(forward_logits(model, batch), batch["labels"]).sum()
            capture.backward(loss)
        yield batch, capture


def query_gradients(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """∇θ f(z_q) for every query: (query_index [Q], {module: [Q, out, in+1]}); f is the completion's summed loss."""
    ids: list[torch.Tensor] = []
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in tracked}
    for batch, capture in captured_batches(model, tracked, batches, dtype):
        ids.append(batch["query_index"])
        for name, grad in capture.per_sequence_gradients().items():
            grads[name].append(grad)
        if on_batch is not None:
            on_batch(len(batch["query_index"]))
    return torch.cat(ids), {name: torch.cat(chunks) for name, chunks in grads.items()}
