"""Per-example gradients of a task's loss or measurement for the tracked modules, from hooks (no weight gradients).

The task (`task.Task`, default the causal LM) says what the objective of an example is: for the LM, the summed
token loss of a sequence with its own labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from distributed_astra.curvature.hooks import GradientCapture
from distributed_astra.errors import DastraError
from distributed_astra.models.modules import TrackedModule
from distributed_astra.task import CAUSAL_LM, Task

Objective = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def captured_batches(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    *,
    task: Task = CAUSAL_LM,
    objective: Objective | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], GradientCapture]]:
    """For each batch, run forward and backward of Σ_n objective(z_n) and yield (batch, capture).

    objective(output, batch) -> [B] defaults to the task's training loss `task.loss`; for the LM it uses the
    batch's own labels, so prompt tokens of a query (label -100) carry no loss (seeds §1).
    """
    objective = task.loss if objective is None else objective
    for batch in batches:
        with torch.enable_grad(), GradientCapture(tracked, task.attention_mask(batch), dtype) as capture:
            capture.backward(objective(task.output(model, batch), batch).sum())
        yield batch, capture


def example_gradients(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    *,
    task: Task = CAUSAL_LM,
    objective: Objective | None = None,
    on_batch: Callable[[dict[str, torch.Tensor]], None] | None = None,
    keep: Sequence[str] | None = None,
    num_examples: int | None = None,
    store: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """∇θ objective(z_n) of every example of `batches`, in order: {module: [N, out, in+1]} (`captured_batches`).

    `on_batch(batch)` is called after each batch. `keep`: only these modules' gradients are formed and kept (a
    rank's owned modules); every tracked module is still captured, so every rank runs the same backward.
    `num_examples` (N, when known): each batch is written into [N, out, in+1] tensors allocated once, instead of
    concatenated at the end (which holds every gradient twice). `store`: the kept gradients' dtype (default
    `dtype`, in which they are formed; bfloat16 halves what is kept)."""
    keep = list(tracked) if keep is None else list(keep)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in keep}
    filled: dict[str, torch.Tensor] = {}
    row = 0
    for batch, capture in captured_batches(model, tracked, batches, dtype, task=task, objective=objective):
        rows = 0
        for name, grad in capture.per_sequence_gradients(keep).items():
            if num_examples is None:
                grads[name].append(grad if store is None else grad.to(store))
                continue
            if name not in filled:
                filled[name] = grad.new_empty(num_examples, *grad.shape[1:], dtype=store or grad.dtype)
            filled[name][row : row + grad.shape[0]] = grad
            rows = grad.shape[0]
        row += rows
        if on_batch is not None:
            on_batch(batch)
    if num_examples is not None:
        if row != num_examples and keep:
            raise DastraError(f"internal: {row} examples where {num_examples} were announced")
        return filled
    return {name: torch.cat(chunks) for name, chunks in grads.items()}


def query_gradients(
    model: nn.Module,
    tracked: dict[str, TrackedModule],
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    on_batch: Callable[[int], None] | None = None,
    *,
    task: Task = CAUSAL_LM,
    keep: Sequence[str] | None = None,
    num_queries: int | None = None,
    store: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """∇θ f(z_q) for every query: (query_index [Q], {module: [Q, out, in+1]} of the modules of `keep`, default
    all, kept in `store`, default `dtype`); f is `task.measurement` (for the LM, the completion's summed loss)."""
    ids: list[torch.Tensor] = []

    def seen(batch: dict[str, torch.Tensor]) -> None:
        ids.append(batch["query_index"])
        if on_batch is not None:
            on_batch(len(batch["query_index"]))

    grads = example_gradients(model, tracked, batches, dtype, task=task, objective=task.measurement, on_batch=seen,
                              keep=keep, num_examples=num_queries, store=store)
    return torch.cat(ids), grads
