"""Distributed execution: Ray outside, DeepSpeed ZeRO inside (docs/distributed.md).

- `cluster`: connect to `ray.address` or start an embedded local Ray; resource checks; `ray.get` with deadlines.
- `worker_group`: N actors forming a torch.distributed group, each holding the model under a DeepSpeed engine.
- `fit`, `solve`: the rank-side EK-FAC fit and parallel iHVP solves, composing `curvature/` and `ihvp/` unchanged.
- `score`: shards handed out to restartable scoring actors, a manifest for resume, the top-k merge.
- `stages`: the driver side of fit/solve/score; `pipeline.py` dispatches to it when `is_distributed(cfg)`.

Importing this package does not import Ray or DeepSpeed; its submodules do.
"""

from distributed_astra.config import SOURCE_SOLVERS, Config
from distributed_astra.distributed.deepspeed_config import effective_stage, load_ds_config
from distributed_astra.errors import DastraError


def is_distributed(cfg: Config) -> bool:
    """More than one worker, a cluster address, or a ZeRO stage: the run goes through Ray and DeepSpeed."""
    return cfg.ray.num_workers > 1 or bool(cfg.ray.address) or cfg.deepspeed.stage > 0


def solve_mode(cfg: Config) -> str:
    """How an iterative solve is split over ranks (distributed/solve.py), the rule the runtime and the planner share:
    `queries` (replicated model, queries split) in one process and, under `ray.solve_mode: auto`, on replicated
    models with the exact GGN product; `data` (every minibatch split) otherwise. ZeRO-3 with the exact GGN product
    (or `queries`) is refused: the product needs whole parameters."""
    stage = effective_stage(cfg.deepspeed.stage)
    if not is_distributed(cfg):
        return "queries"
    if stage == 3 and (cfg.ray.solve_mode == "queries" or cfg.solver.product == "ggn"):
        raise DastraError(
            "deepspeed.stage 3 partitions the parameters, which the exact GGN product (torch.func) and "
            "ray.solve_mode=queries need whole: use solver.product=fisher with ray.solve_mode=data (or auto), "
            "or deepspeed.stage=0"
        )
    if cfg.ray.solve_mode == "auto":
        return "queries" if stage == 0 and cfg.solver.product == "ggn" else "data"
    return cfg.ray.solve_mode


def validate_distributed(cfg: Config) -> None:
    """Checks that need no cluster (called when the context opens): the DeepSpeed JSON against the run config."""
    load_ds_config(cfg)
    source = [n for n in (cfg.solver.name, *cfg.solver.baselines) if n in SOURCE_SOLVERS]
    if source:
        raise DastraError(
            f"solver '{source[0]}' runs single-process only: set ray.num_workers=1 (and ray.address=null, "
            "deepspeed.stage=0), or pick another solver.name / solver.baselines"
        )
    if cfg.scoring.dense:
        raise DastraError("scoring.dense: the dense N x Q matrix is written by single-process runs only; set it false")
