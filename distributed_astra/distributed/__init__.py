"""Distributed execution: Ray outside, DeepSpeed ZeRO inside (docs/distributed.md).

- `cluster`: connect to `ray.address` or start an embedded local Ray; resource checks; `ray.get` with deadlines.
- `worker_group`: N actors forming a torch.distributed group, each holding the model under a DeepSpeed engine.
- `fit`, `solve`: the rank-side EK-FAC fit and parallel iHVP solves, composing `curvature/` and `ihvp/` unchanged.
- `score`: shards handed out to restartable scoring actors, a manifest for resume, the top-k merge.
- `stages`: the driver side of fit/solve/score; `pipeline.py` dispatches to it when `is_distributed(cfg)`.

Importing this package does not import Ray or DeepSpeed; its submodules do.
"""

from distributed_astra.config import Config


def is_distributed(cfg: Config) -> bool:
    """More than one worker, a cluster address, or a ZeRO stage: the run goes through Ray and DeepSpeed."""
    return cfg.ray.num_workers > 1 or bool(cfg.ray.address) or cfg.deepspeed.stage > 0
