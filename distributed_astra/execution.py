"""Where a stage's rank functions run: the executor, and the rank they see (docs/architecture.md, "Executors").

Every stage driver (stages/) is written once, against `Executor`:

    executor.map(fn, *args, cfg=cfg, what="fit")                 # fn(rank, *args) on every rank, results in order
    executor.map_shards(fn, shards, *args, cfg=cfg, on_result=f)  # fn(rank, shard, *args) per shard, any free worker

`InProcessExecutor` is the one-rank case: the run context's own model, no process group, the collectives of
distributed/collectives.py reduce over one rank (identity). `distributed.executor.RayExecutor` runs the same
functions on a worker group (N Ray actors, one torch.distributed group, the model under DeepSpeed) and the shard
functions on restartable Ray actors. Rank functions are module-level functions; they see only their `Rank`.

This module imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distributed_astra.config import Config
from distributed_astra.data.corpus import CorpusShard, CorpusStats, open_corpus
from distributed_astra.data.sequences import SequenceFormat, iter_training_batches
from distributed_astra.models.modules import TrackedModule

Shard = TypeVar("Shard")
Progress = Callable[[str, int], None]


@dataclass
class Rank:
    """What a rank function sees: its rank, the group size, the step's config and the model (under DeepSpeed on a
    worker group: `engine.module`, called directly), its tracked modules and tokenizer."""

    rank: int
    world_size: int
    cfg: Config
    model: nn.Module
    tracked: dict[str, TrackedModule]
    tokenizer: PreTrainedTokenizerBase
    stage: int = 0  # the effective ZeRO stage (0 or 3)
    progress: Progress | None = None  # (unit, count) live progress: set in process, None on Ray workers
    held: dict[str, Any] = field(default_factory=dict)  # kept between calls (scoring: its prepared directions)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.cfg.ray.use_gpu else torch.device("cpu")

    def training_batches(
        self, corpus: str, batch_size: int, max_sequences: int | None = None, shard: CorpusShard | None = None,
        stats: CorpusStats | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The corpus's training batches in corpus order (the same on every rank): `data.*` columns, split and
        sequence format; `shard` restricts the pass to one shard of `Corpus.shard_plan`."""
        data = self.cfg.data
        return iter_training_batches(
            open_corpus(corpus, data.text_column, data.id_column, data.split), self.tokenizer,
            SequenceFormat.from_data(data), batch_size, max_sequences=max_sequences, shard=shard, stats=stats,
        )

    def advance(self, unit: str, count: int) -> None:
        """Report `count` units of work done (`unit` names the progress bar the driver opened)."""
        if self.progress is not None:
            self.progress(unit, count)


class Executor(Protocol):
    """Runs rank functions for the stage drivers: on every rank of a group (`map`) or shard by shard (`map_shards`)."""

    @property
    def world_size(self) -> int: ...

    @property
    def stage(self) -> int: ...

    def map(self, fn: Callable[..., Any], *args: Any, cfg: Config, what: str, progress: Progress | None = None
            ) -> list[Any]:
        """`fn(rank, *args)` on every rank with the same arguments; the results in rank order."""
        ...

    def map_shards(
        self, fn: Callable[..., Any], shards: Iterable[Shard], *args: Any, cfg: Config, what: str,
        on_result: Callable[[Shard, Any], None],
    ) -> None:
        """`fn(rank, shard, *args)` for every shard, on whichever worker is free; `on_result(shard, result)` on the
        driver as each finishes (a shard is retried on a restarted worker when its worker dies)."""
        ...

    def worker_pids(self) -> list[int]:
        """The processes running shard functions now."""
        ...

    def close(self) -> None: ...


class InProcessExecutor:
    """One rank in this process: the run context's model, no process group."""

    world_size = 1
    stage = 0

    def __init__(self, model: nn.Module, tracked: dict[str, TrackedModule], tokenizer: PreTrainedTokenizerBase):
        self.model, self.tracked, self.tokenizer = model, tracked, tokenizer
        self.held: dict[str, Any] = {}

    def rank(self, cfg: Config, progress: Progress | None = None) -> Rank:
        return Rank(0, 1, cfg, self.model, self.tracked, self.tokenizer, 0, progress, self.held)

    def map(self, fn: Callable[..., Any], *args: Any, cfg: Config, what: str, progress: Progress | None = None
            ) -> list[Any]:
        return [fn(self.rank(cfg, progress), *args)]

    def map_shards(
        self, fn: Callable[..., Any], shards: Iterable[Shard], *args: Any, cfg: Config, what: str,
        on_result: Callable[[Shard, Any], None],
    ) -> None:
        rank = self.rank(cfg)
        for shard in shards:
            on_result(shard, fn(rank, shard, *args))

    def worker_pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        pass
