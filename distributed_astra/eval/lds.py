"""The linear datamodeling score (seeds §9.1, ASTRA Eq 6), with the sign fixed as in seeds §13.1.

For query z_q, M random subsets S_j of ⌊βN⌋ training examples (kept), and scores τ(z_m, z_q) (positive =
removing z_m increases f; docs/design.md):

    Γ_j   = Σ_{z_m ∉ S_j} τ(z_m, z_q)             predicted change of f when training on S_j instead of D
    ψ_j   = mean_r f_q(θ^s(S_j; r))               measured: R retraining seeds, diverged runs left out
    LDS_q = Spearman_j(Γ_j, ψ_j)

The sum runs over the REMOVED examples (kronfluence's `evaluate_lds`): summing τ over the kept ones would flip the
sign, since Σ_{kept} τ = Σ_all τ − Γ_j. The reported LDS is the mean over queries (queries whose ψ or Γ is constant
over subsets have no rank correlation and are left out, counted). Single-model rows average each query's LDS over
the E models; ensemble rows use the scores averaged over the E models (seeds Eq 11).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distributed_astra.artifacts import atomic_path
from distributed_astra.config import Config, EvalConfig, SolverConfig, eval_solver
from distributed_astra.errors import DastraError
from distributed_astra.eval import source_methods  # noqa: F401  (registers source and astra-source)
from distributed_astra.eval.methods import Method, MethodSettings, ModelAttribution, get_method
from distributed_astra.eval.retrain import RetrainCache, run_jobs
from distributed_astra.eval.tasks import TASKS, build_task
from distributed_astra.progress import console, progress_bar


# ==================================================================================================== the score
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M along the last dimension, ties sharing their average rank (as scipy.stats.rankdata)."""
    x = x.to(torch.float64)
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    positions = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64).expand_as(x)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group = new_group.cumsum(-1) - 1  # tie-group id along the sorted axis
    sums = torch.zeros_like(sorted_x).scatter_add_(-1, group, positions)
    counts = torch.zeros_like(sorted_x).scatter_add_(-1, group, torch.ones_like(positions))
    ranks_sorted = (sums / counts.clamp_min(1)).gather(-1, group)
    return torch.empty_like(ranks_sorted).scatter_(-1, order, ranks_sorted)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ along the last dimension (Pearson of average ranks); NaN where x or y is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx = rx - rx.mean(-1, keepdim=True)
    ry = ry - ry.mean(-1, keepdim=True)
    denom = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (rx * ry).sum(-1) / denom.clamp_min(1e-300), torch.full_like(denom, math.nan))


def removed_mask(kept: list[torch.Tensor], num_train: int) -> torch.Tensor:
    """[M, N] float: 1 where example m is NOT in subset S_j."""
    mask = torch.ones(len(kept), num_train, dtype=torch.float64)
    for j, index in enumerate(kept):
        mask[j, index] = 0.0
    return mask


def group_effects(scores: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Γ [Q, M] = Σ_{m ∉ S_j} τ(z_m, z_q) from scores [Q, N] and the removed mask [M, N]."""
    return scores.to(torch.float64) @ removed.T


def lds_per_query(scores: torch.Tensor, removed: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """LDS_q [Q] from scores [Q, N], removed mask [M, N] and measured ψ [M, Q] (NaN: undefined for that query)."""
    return spearman(group_effects(scores, removed), measured.T.to(torch.float64))


@dataclass
class GroundTruth:
    """ψ [M', Q] over the subsets with at least one finished, non-diverged retraining; `subsets` are their j."""

    measured: torch.Tensor
    subsets: list[int]
    num_runs: int
    num_diverged: int
    num_subsets_dropped: int
    retrain_seconds: float


def ground_truth(records: dict[tuple[int, int], dict], num_subsets: int, num_seeds: int) -> GroundTruth:
    """Average f over the non-diverged retraining seeds of each subset; all-diverged subsets are left out."""
    measured, subsets = [], []
    diverged = 0
    seconds = 0.0
    for j in range(num_subsets):
        runs = [records[(j, r)] for r in range(num_seeds)]
        seconds += sum(float(run["seconds"]) for run in runs)
        good = [torch.tensor(run["measurements"], dtype=torch.float64) for run in runs if not run["diverged"]]
        diverged += num_seeds - len(good)
        if good:
            measured.append(torch.stack(good).mean(0))
            subsets.append(j)
    if len(subsets) < 2:
        raise DastraError(
            f"only {len(subsets)} of {num_subsets} subsets have a retraining that did not diverge "
            f"({diverged} of {num_subsets * num_seeds} runs diverged): the task's recipe is unstable"
        )
    return GroundTruth(torch.stack(measured), subsets, num_subsets * num_seeds, diverged,
                       num_subsets - len(subsets), seconds)


# ==================================================================================================== the harness
@dataclass
class LdsRow:
    method: str
    label: str
    damping_scale: float | None
    single_mean: float
    single_std: float
    ensemble_mean: float
    ensemble_std: float
    num_queries: int
    seconds: float


@dataclass
class LdsResult:
    task: str
    description: str
    settings: dict
    rows: list[LdsRow]
    sweep: list[LdsRow]
    num_train: int
    num_queries: int
    num_runs: int
    num_diverged: int
    num_subsets_dropped: int
    retrain_seconds: float
    trained_now: int
    wall_seconds: float
    dampings: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LdsResult:
        rows = [LdsRow(**r) for r in data.pop("rows")]
        sweep = [LdsRow(**r) for r in data.pop("sweep")]
        return cls(rows=rows, sweep=sweep, **data)


# The solver settings the LDS ran with before eval.solver (all of SolverConfig's defaults but these): a key of
# _settings_hash only where the settings now differ from them, so the score caches of those runs stay valid.
_LEGACY_SOLVER = SolverConfig(lr_mode="absolute", tolerance=0.0).model_dump()
_HASHED_AS_LIST = ("iterations", "minibatch_size", "lr", "momentum", "lr_decay", "lr_decay_every")
_NOT_READ = ("name", "baselines", "damping")  # set per method, or λ = eval.damping_scale × mean(Λ)


def _settings_hash(method: Method, settings: MethodSettings) -> str:
    e, s = settings.eval, settings.solver
    relevant = {"method": method.name, "solver": [s.iterations, s.minibatch_size, s.lr, e.sni_lr, s.momentum,
                                                   s.lr_decay, s.lr_decay_every], "trak_dim": e.trak_dim}
    changed = {k: v for k, v in s.model_dump().items()
               if k not in _HASHED_AS_LIST + _NOT_READ and v != _LEGACY_SOLVER[k]}
    if changed:
        relevant["solver_other"] = changed
    if method.uses_damping:
        relevant["damping_scale"] = settings.damping_scale
    if method.uses_segments:
        relevant["num_segments"] = settings.source.num_segments
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def _cached_scores(path: Path, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """A method's scores on one model and the seconds they took to compute, from the cache when it holds them."""
    if path.is_file():
        cached = torch.load(path)
        if isinstance(cached, dict):  # an older cache file holds the bare tensor, without its compute time: redo it
            return cached["scores"], float(cached["seconds"])
    start = time.perf_counter()
    scores = compute()
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(scores).all()):
        raise DastraError(f"non-finite attribution scores ({path.name}): the method diverged on this model")
    with atomic_path(path) as tmp:
        torch.save({"scores": scores, "seconds": seconds}, tmp)
    return scores, seconds


def _row(method: Method, scale: float | None, per_model: list[torch.Tensor], removed, measured, seconds) -> LdsRow:
    singles = torch.stack([lds_per_query(s, removed, measured) for s in per_model]).mean(0)
    ensemble = lds_per_query(torch.stack(per_model).mean(0), removed, measured)
    valid = torch.isfinite(singles) & torch.isfinite(ensemble)
    return LdsRow(
        method.name, method.label, scale,
        float(singles[valid].mean()), float(singles[valid].std()),
        float(ensemble[valid].mean()), float(ensemble[valid].std()),
        int(valid.sum()), seconds,
    )


def check_names(task_name: str, method_names: list[str]) -> list[Method]:
    """The methods, after checking every name (an unknown task or method raises, listing the valid ones)."""
    if task_name not in TASKS:
        raise DastraError(f"eval task '{task_name}' is unknown; valid tasks: {', '.join(TASKS)}")
    if not method_names:
        raise DastraError("--methods is empty: name at least one method")
    return [get_method(name) for name in method_names]


def run_lds(cfg: Config, task_name: str, method_names: list[str], log: Callable[[dict], None] | None = None) -> LdsResult:
    """Retrain (Ray, cached), score every method on E models (cached), and compute the LDS table of one task."""
    start = time.perf_counter()
    e: EvalConfig = cfg.eval
    methods = check_names(task_name, method_names)
    cache_dir = Path(e.cache_dir)
    task = build_task(task_name, cache_dir / "data", e.recipe)
    task.prepare()
    cache = RetrainCache(cache_dir, task, e.subset_fraction, e.seed)
    model_jobs = [cache.model_job(i) for i in range(e.ensemble_size)]
    retrain_jobs = [cache.retrain_job(j, r) for j in range(e.num_subsets) for r in range(e.num_retrain_seeds)]
    jobs = retrain_jobs + model_jobs  # subset results first: they are cached even if a model's training fails
    todo = sum(not job.path.is_file() for job in jobs)
    with progress_bar(f"retrain {task.name} (Ray)", todo, "runs") as advance:
        trained_now = run_jobs(cache, jobs, cfg.ray, lambda record: advance(1))
    records = {(j, r): cache.load_record(j, r) for j in range(e.num_subsets) for r in range(e.num_retrain_seeds)}
    truth = ground_truth(records, e.num_subsets, e.num_retrain_seeds)
    if truth.num_diverged:
        console.print(f"[yellow]warning:[/] {truth.num_diverged} of {truth.num_runs} retraining runs of {task.name} "
                      f"diverged and are left out ({truth.num_subsets_dropped} subsets dropped)")
    kept = [cache.retrain_job(j, 0).train_index for j in truth.subsets]
    removed = removed_mask(kept, task.num_train)

    models = [ModelAttribution(task, cache.load_model(i), seed=i) for i in range(e.ensemble_size)]
    scales = [e.damping_scale, *[s for s in e.damping_sweep if s != e.damping_scale]]
    rows, sweep = [], []
    dampings: dict[str, list[float]] = {}
    units = sum(len(scales) if m.uses_damping else 1 for m in methods) * len(models)
    with progress_bar(f"attribute {task.name}", units, "model-methods") as advance:
        for method in methods:
            for scale in scales if method.uses_damping else [None]:
                settings = MethodSettings(cfg, e.damping_scale if scale is None else scale)
                key = _settings_hash(method, settings)
                per_model, seconds = [], 0.0
                for i, ctx in enumerate(models):
                    scores, took = _cached_scores(cache.root / "scores" / f"{method.name}-{key}-model{i:02d}.pt",
                                                  lambda ctx=ctx: method.score(ctx, settings))
                    per_model.append(scores)
                    seconds += took
                    advance(1)
                row = _row(method, scale, per_model, removed, truth.measured, seconds)
                (rows if scale in (None, e.damping_scale) else sweep).append(row)
                if method.uses_damping and scale == e.damping_scale:
                    sweep.append(row)
                if log is not None:
                    suffix = "" if scale is None else f"/scale{scale:g}"
                    log({f"lds/{task.name}/{method.name}{suffix}/single": row.single_mean,
                         f"lds/{task.name}/{method.name}{suffix}/ensemble": row.ensemble_mean})
    if any(m.uses_damping for m in methods):
        dampings = {f"{s:g}": [ctx.damping(s) for ctx in models] for s in scales}
    sweep.sort(key=lambda r: (r.method, r.damping_scale))
    solver = eval_solver(cfg)
    return LdsResult(
        task=task.name,
        description=task.description,
        settings={
            "M": e.num_subsets, "beta": e.subset_fraction, "R": e.num_retrain_seeds, "E": e.ensemble_size,
            "damping_scale": e.damping_scale, "exact_damping": task.exact_damping, "iterations": solver.iterations,
            "minibatch_size": solver.minibatch_size, "astra_lr": solver.lr, "astra_lr_mode": solver.lr_mode,
            "sni_lr": e.sni_lr, "momentum": solver.momentum, "lr_decay": solver.lr_decay,
            "lr_decay_every": solver.lr_decay_every, "trak_dim": e.trak_dim,
            "recipe": task.recipe,
        },
        rows=rows,
        sweep=sweep,
        num_train=task.num_train,
        num_queries=task.num_queries,
        num_runs=truth.num_runs,
        num_diverged=truth.num_diverged,
        num_subsets_dropped=truth.num_subsets_dropped,
        retrain_seconds=truth.retrain_seconds,
        trained_now=trained_now,
        wall_seconds=time.perf_counter() - start,
        dampings=dampings,
    )
