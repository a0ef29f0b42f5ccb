"""torch.distributed helpers shared by the rank-side stages: flat all-reduce of tensor dicts, module-by-module
broadcast, gathering a module's tensors to its owner, and the bookkeeping that keeps N ranks bit-compatible with one process.

Outside a process group (the in-process executor, a scoring actor) every collective is over one rank: the identity.

Two rules make a distributed stage reproduce the single-process result:

* Label sampling (true Fisher, `models.lm.sample_labels`) draws one float32 uniform per predicted position, row by
  row, from one seeded generator. A rank that skips a batch (or a slice of one) advances its generator by exactly the
  uniforms that batch would have drawn (`advance_label_stream`), so every row gets the label it gets in one process.
* Under ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so every rank must run the
  same number of forwards: a rank with fewer batches runs `padding_batch`es, which carry no token and no loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from distributed_astra.models.lm import IGNORE_INDEX

SENT: Counter[str] = Counter()  # bytes this process sent, per collective: `sent_bytes`


def sent_bytes() -> dict[str, int]:
    """Bytes this process has sent through this module's collectives, per kind, as bandwidth-optimal algorithms
    send them: an all-reduce 2(N−1)/N of its buffer (ring), a gather the rank's padded tensor (nothing on the
    destination), a broadcast the buffer from the source to N−1 ranks, an all-gather the rank's piece to N−1 ranks.
    DeepSpeed's own ZeRO-3 parameter gathers are not counted. Take differences around a step."""
    return dict(SENT)


def _sent(kind: str, t: torch.Tensor, times: float) -> None:
    SENT[kind] += int(t.numel() * t.element_size() * times)


def in_group() -> bool:
    """This process is one of several ranks of a torch.distributed group."""
    return dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where this group's collectives take their tensors: the rank's GPU under NCCL (which takes only CUDA
    tensors), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ over ranks of every tensor, through ONE flat all-reduce per dtype (in place order: dict order)."""
    if not in_group():
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    for dtype, names in by_dtype.items():
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        world = dist.get_world_size()
        _sent("all_reduce", flat, 2 * (world - 1) / world)
        dist.all_reduce(flat)
        offset = 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[offset : offset + size].view_as(tensors[n])
            offset += size
    return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of one tensor (a new tensor; the tensor itself outside a group)."""
    return all_reduce_sum({"t": t})["t"]


def sum_over_other_ranks(t: torch.Tensor) -> torch.Tensor:
    """Σ over the other ranks of their `t`, this rank adding zeros (stages/solve.py: a module-less rank shadows a
    module whose owner counts it)."""
    return sum_over_ranks(torch.zeros_like(t))


def all_reduce_counts(*counts: int, op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[int]:
    """Integer counts reduced over ranks (sum by default)."""
    if not in_group():
        return list(counts)
    t = torch.tensor(counts, dtype=torch.float64, device=collective_device())
    _sent("all_reduce", t, 2 * (dist.get_world_size() - 1) / dist.get_world_size())
    dist.all_reduce(t, op=op)
    return [int(round(v)) for v in t.cpu().tolist()]


def broadcast_tensors(tensors: list[torch.Tensor], src: int) -> None:
    """Broadcast a list of tensors from rank `src`, in place, as one flat buffer."""
    if not in_group():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()
    if dist.get_rank() == src:
        _sent("broadcast", flat, dist.get_world_size() - 1)
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_state(state: torch.Tensor, src: int) -> torch.Tensor:
    """A generator state (a CPU uint8 tensor, the same size on every rank) from rank `src`, through the group's
    collective device; the state itself outside a group."""
    if not in_group():
        return state
    buffer = state.to(collective_device())
    if dist.get_rank() == src:
        _sent("broadcast", buffer, dist.get_world_size() - 1)
    dist.broadcast(buffer, src=src)
    return buffer.cpu()


def gather_to(tensors: list[torch.Tensor], dst: int) -> list[list[torch.Tensor]]:
    """Every rank's `tensors` (same count and ranks, any shapes) on rank `dst`, in rank order; [] elsewhere.

    The shapes are exchanged first (one small all-gather), each tensor is zero-padded to the largest shape for the
    gather and trimmed back on `dst`, so `dst` receives exactly what each rank sent. One rank: [tensors]."""
    if not in_group():
        return [list(tensors)]
    device = collective_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = torch.tensor([d for t in tensors for d in t.shape], dtype=torch.long, device=device)
    every = [torch.empty_like(dims) for _ in range(world)]
    _sent("all_gather", dims, world - 1)
    dist.all_gather(every, dims)
    shapes: list[list[tuple[int, ...]]] = []
    for flat in every:
        flat, offset, per_rank = flat.cpu().tolist(), 0, []
        for t in tensors:
            per_rank.append(tuple(flat[offset : offset + t.dim()]))
            offset += t.dim()
        shapes.append(per_rank)
    out: list[list[torch.Tensor]] = [[] for _ in range(world)] if rank == dst else []
    for i, t in enumerate(tensors):
        largest = tuple(max(s[i][d] for s in shapes) for d in range(t.dim()))
        padded = t.new_zeros(largest, device=device)
        padded[tuple(slice(0, n) for n in t.shape)] = t
        received = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
        if rank != dst:
            _sent("gather", padded, 1)
        dist.gather(padded, received, dst=dst)
        if rank == dst:
            for r, piece in enumerate(received):
                out[r].append(piece[tuple(slice(0, n) for n in shapes[r][i])].to(t.device))
    return out


def owner_route(owners: Mapping[str, int]) -> Callable[[str, list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The `curvature.covariance.Route` of module ownership: a module's tensors from every rank reach its owner
    (`gather_to`, ranks in order), the other ranks keep nothing of it."""
    return lambda name, tensors: gather_to(tensors, owners[name])


def slice_bounds(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a batch that `rank` takes: contiguous, sizes differing by at most one, rank order."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def label_draws(batch: Mapping[str, torch.Tensor]) -> int:
    """Uniforms `sample_labels` draws for a batch: one per position that predicts a next token, B·(T-1)."""
    rows, width = batch["input_ids"].shape
    return int(rows) * max(0, int(width) - 1)


def advance_label_stream(generator: torch.Generator | None, draws: int) -> None:
    """Consume `draws` float32 uniforms of `generator` exactly as `sample_labels` would (then discard them)."""
    if generator is not None and draws > 0:
        torch.rand(draws, 1, generator=generator, dtype=torch.float32, device=generator.device)


def padding_batch(like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row of two padding tokens: a full forward and backward that adds no token, sequence or loss."""
    ids = torch.zeros(1, 2, dtype=like["input_ids"].dtype)
    return {
        "input_ids": ids,
        "attention_mask": torch.zeros_like(ids),
        "labels": torch.full_like(ids, IGNORE_INDEX),
        **({"doc_id": torch.full((1,), -1, dtype=torch.long)} if "doc_id" in like else {}),
    }


class RankBatches:
    """This rank's share of a deterministic batch stream: batch i belongs to rank i mod world_size.

    Iterating yields the owned batches in order, advances `generator` past the labels of the others, then (once the
    stream is exhausted and `generator.get_state()` recorded as `state_after`) yields padding batches until this
    rank has run as many batches as the rank with the most, ceil(n / world_size).
    """

    def __init__(
        self, batches: Iterable[dict[str, torch.Tensor]], rank: int, world_size: int, generator: torch.Generator | None
    ) -> None:
        self.batches = batches
        self.rank = rank
        self.world_size = world_size
        self.generator = generator
        self.state_after: torch.Tensor | None = None
        self.num_batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        owned = 0
        last: dict[str, torch.Tensor] | None = None
        for index, batch in enumerate(self.batches):
            self.num_batches = index + 1
            last = batch
            if index % self.world_size == self.rank:
                owned += 1
                yield batch
            else:
                advance_label_stream(self.generator, label_draws(batch))
        if self.generator is not None:
            self.state_after = self.generator.get_state()
        most = -(-self.num_batches // self.world_size)
        for _ in range(most - owned):
            yield padding_batch(last)

    def restore(self) -> None:
        """Put the generator where one process would have it after the whole stream (padding draws undone)."""
        if self.generator is not None and self.state_after is not None:
            self.generator.set_state(self.state_after)
