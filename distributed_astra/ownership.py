"""Which rank owns each tracked module's attribution state (docs/distributed.md, "Module ownership").

ZeRO-3 gives every parameter one owner rank and gathers it on use; the attribution state is sharded the same way,
by whole modules: the owner of module m holds m's EK-FAC factors (Q_A, d_A, Q_S, d_S, Λ) and, in the solve, every
query's [out, in+1] block of m (v, the iterate, the momentum and the product's result). Modules are placed largest
first onto the least-loaded rank (LPT), weighed by the bytes they cost there (`module_bytes`), so a rank's share is
at most total/N plus the largest module's.

The runtime (stages/fit.py, stages/query.py, stages/solve.py) and the planner (plan/estimate.py) all call
`run_owners` with the run's config, so the plan's per-rank bytes are the runtime's. Nothing here touches
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Mapping

from distributed_astra.config import Config
from distributed_astra.curvature.covariance import STAT_DTYPES
from distributed_astra.ihvp.solvers import LIVE_VECTORS_PER_QUERY

Shape = tuple[int, int]  # (out, in+1): a module's gradient layout


def factor_elements(shape: Shape) -> int:
    """Numbers of one module's factors: Q_A [in+1]², d_A, Q_S [out]², d_S and Λ [out, in+1]."""
    out, inn = shape
    return inn * inn + inn + out * out + out + out * inn


def state_elements(shape: Shape, queries: int) -> int:
    """Numbers of one module's solver state for `queries` queries: v and LIVE_VECTORS_PER_QUERY blocks each."""
    out, inn = shape
    return (1 + LIVE_VECTORS_PER_QUERY) * queries * out * inn


def module_bytes(shape: Shape, stat_bytes: int, vector_bytes: int, queries: int) -> int:
    """What owning one module costs its rank: the factors in the statistics dtype plus the solve's query state."""
    return factor_elements(shape) * stat_bytes + state_elements(shape, queries) * vector_bytes


def balance_by_cost(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Assign items to ranks, largest first onto the least-loaded rank (LPT); ties go to the lower rank."""
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


def run_costs(cfg: Config, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """`module_bytes` of every module with a run's settings: the statistics dtype `factors.dtype`, float32 solver
    vectors and `solver.query_batch_size` queries."""
    stat_bytes = STAT_DTYPES[cfg.factors.dtype].itemsize
    return {n: module_bytes(s, stat_bytes, 4, cfg.solver.query_batch_size) for n, s in shapes.items()}


def run_owners(cfg: Config, shapes: Mapping[str, Shape], world_size: int) -> dict[str, int]:
    """{module: owner rank} in the modules' order, balanced by `run_costs`; the fit, the query stage, the solve and
    the planner all call this. With more ranks than modules some ranks own none (they still take their share of
    the fit's and the query stage's data work)."""
    owner = balance_by_cost(run_costs(cfg, shapes), world_size)
    return {n: owner[n] for n in shapes}


def busiest_owned(cfg: Config, shapes: Mapping[str, Shape], world_size: int) -> list[str]:
    """The modules of the rank whose owned `run_costs` are largest (the lowest such rank): what the planner sizes."""
    costs, owners = run_costs(cfg, shapes), run_owners(cfg, shapes, world_size)
    busiest = max(range(world_size), key=lambda r: (sum(costs[n] for n in owned(owners, r)), -r))
    return owned(owners, busiest)


def owned(owners: Mapping[str, int], rank: int) -> list[str]:
    """The modules `rank` owns, in model order."""
    return [n for n, r in owners.items() if r == rank]
