"""Distributed execution: Ray outside, DeepSpeed ZeRO inside (docs/distributed.md).

- `cluster`: connect to `ray.address` or start an embedded local Ray; resource checks; `ray.get` with deadlines.
- `worker_group`: N actors forming a torch.distributed group, each holding the model under a DeepSpeed engine.
- `executor`: execution.py's executor on Ray: rank functions on the worker group, shard functions on restartable
  actors. The stage drivers (stages/) run on it unchanged; this package holds no stage logic.
- `collectives`: all-reduce, broadcast, work balancing and the label-stream bookkeeping of the rank functions.

Importing this package does not import Ray or DeepSpeed; its submodules do.
"""

from distributed_astra.config import SOURCE_SOLVERS, Config
from distributed_astra.distributed.deepspeed_config import effective_stage, load_ds_config
from distributed_astra.errors import DastraError


def is_distributed(cfg: Config) -> bool:
    """More than one worker, a cluster address, or a ZeRO stage: the run goes through Ray and DeepSpeed."""
    return cfg.ray.num_workers > 1 or bool(cfg.ray.address) or cfg.deepspeed.stage > 0


def solve_mode(cfg: Config) -> str:
    """How an iterative solve is split over ranks (stages/solve.py), the rule the runtime and the planner share:
    `queries` (replicated model, queries split) in one process and, under `ray.solve_mode: auto`, on replicated
    models with the exact GGN product; `data` (every minibatch split) otherwise; `modules` (module ownership) when
    asked for. ZeRO-3 with the exact GGN product (or `queries`) is refused: the product needs whole parameters."""
    stage = effective_stage(cfg.deepspeed.stage)
    if not is_distributed(cfg):
        return "queries"
    if stage == 3 and (cfg.ray.solve_mode == "queries" or cfg.solver.product == "ggn"):
        raise DastraError(
            "deepspeed.stage 3 partitions the parameters, which the exact GGN product (torch.func) and "
            "ray.solve_mode=queries need whole: use solver.product=fisher with ray.solve_mode=data, modules "
            "(or auto), or deepspeed.stage=0"
        )
    if cfg.ray.solve_mode == "auto":
        return "queries" if stage == 0 and cfg.solver.product == "ggn" else "data"
    return cfg.ray.solve_mode


def score_mode(cfg: Config) -> str:
    """How scoring runs (stages/score.py), the rule the runtime and the planner share: `replicas` (restartable
    actors, each with the whole model and every direction) in one process and, under `ray.score_mode: auto`, on
    replicated models; `modules` (the worker group, directions held by their modules' owners) under ZeRO-3 or
    when asked for."""
    if not is_distributed(cfg):
        return "replicas"
    if cfg.ray.score_mode == "auto":
        return "modules" if effective_stage(cfg.deepspeed.stage) == 3 else "replicas"
    return cfg.ray.score_mode


def validate_distributed(cfg: Config) -> None:
    """Checks that need no cluster (called when the context opens): the DeepSpeed JSON against the run config;
    SOURCE sets the ranks' weights to its checkpoints', which needs whole parameters."""
    load_ds_config(cfg)
    source = [n for n in (cfg.solver.name, *cfg.solver.baselines) if n in SOURCE_SOLVERS]
    if source and effective_stage(cfg.deepspeed.stage) == 3:
        raise DastraError(
            f"solver '{source[0]}' loads each trajectory checkpoint's weights into the ranks' models, which "
            "deepspeed.stage 3 partitions: use deepspeed.stage=0 (or 1, 2), or another solver.name / solver.baselines"
        )
