"""Which rank owns each tracked module's attribution state (docs/distributed.md, "Module ownership").

ZeRO-3 gives every parameter one owner rank and gathers it on use; the attribution state is sharded the same way,
by whole modules: the owner of module m holds m's EK-FAC factors (Q_A, d_A, Q_S, d_S, Λ) and, in the solve, every
query's [out, in+1] block of m (v, the iterate, the momentum and the product's result). Modules are placed largest
first onto the least-loaded rank (LPT), weighed by the bytes they cost there (`module_bytes`), so a rank's share is
at most total/N plus the largest module's.

The runtime (stages/fit.py, stages/solve.py) and the planner (plan/estimate.py) both call `module_owners` with the
same arguments, so the plan's per-rank bytes are the runtime's. Nothing here touches torch.distributed.
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


def module_owners(
    shapes: Mapping[str, Shape], world_size: int, stat_bytes: int = 8, vector_bytes: int = 4, queries: int = 1
) -> dict[str, int]:
    """{module: owner rank} in the modules' order, balanced by `module_bytes`. With more ranks than modules some
    ranks own none (they still take their share of the data work)."""
    owner = balance_by_cost({n: module_bytes(s, stat_bytes, vector_bytes, queries) for n, s in shapes.items()},
                            world_size)
    return {n: owner[n] for n in shapes}


def run_owners(cfg: Config, shapes: Mapping[str, Shape], world_size: int) -> dict[str, int]:
    """`module_owners` with a run's settings: the statistics dtype `factors.dtype`, float32 solver vectors and
    `solver.query_batch_size` queries; the fit, the solve and the planner all call this."""
    return module_owners(shapes, world_size, STAT_DTYPES[cfg.factors.dtype].itemsize, 4, cfg.solver.query_batch_size)


def owned(owners: Mapping[str, int], rank: int) -> list[str]:
    """The modules `rank` owns, in model order."""
    return [n for n, r in owners.items() if r == rank]
