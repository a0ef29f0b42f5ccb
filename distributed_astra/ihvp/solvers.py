"""iHVP solvers x ≈ (G + λI)⁻¹ v, batched over Q queries that share every curvature minibatch (seeds §4-5).

    solve(v, preconditioner, product, batches, cfg, damping) -> SolveResult

`cfg` is a `SolverConfig`; `cfg.name` picks the method:

  ekfac   x = (P + λI)⁻¹ v: the preconditioner applied once (no product, no minibatch).
  sni     Eq 3: x_{k+1} = x_k − α[(G̃_k + λI) x_k − v], from x_0 = v (Koh & Liang's and the public LiSSA code's
          initialisation, seeds §4: the 0-iteration answer is the gradient dot product; pass x0 = zeros for the
          truncated-Neumann form α Σ_{j<J} (I − α(G+λI))^j v).
  lissa   Alg 1: cfg.lissa_repeats independent SNI runs of cfg.iterations steps each from x_0 = v, on fresh
          minibatches, averaged (R = 1 is SNI).
  astra   Eq 5: x_{k+1} = x_k − α (P + λ̃I)⁻¹[(G̃_k + λI) x_k − v], from x_0 = (P + λ̃I)⁻¹ v (the EK-FAC solution;
          with x_0 = 0 and α = 1 the first step lands there exactly, seeds §5).

All three iterative methods take the step through the same SGD: heavy-ball momentum cfg.momentum (PyTorch's
convention b_k = μ b_{k−1} + d_k, x ← x − α_k b_k) and the step schedule α_k = α · decay^⌊k / every⌋
(cfg.lr_decay, cfg.lr_decay_every), with α = cfg.lr · λ when cfg.lr_mode == "relative" (seeds Table 3),
α = cfg.lr when "absolute" (Fig 3), and α = cfg.lr / μ̂ when "auto", μ̂ being the largest eigenvalue of the
minibatch operator (P + λ̃I)⁻¹(G̃ + λI) (of G̃ + λI for sni/lissa) found by power iteration before the first step
(`largest_eigenvalue`): heavy-ball momentum μ is stable for α·μ_max < 2(1 + μ), so α = 1/μ̂ keeps a margin for
minibatches steeper than the probed ones whatever the scale of G. SNI and LiSSA are exactly Eq 3 / Alg 1 with cfg.momentum = 0 and
cfg.lr_decay = 1; ASTRA differs from SNI only by its preconditioner and initialisation, which keeps the comparison
fair.

`preconditioner` is a callable applying (P + λ̃I)⁻¹ to a direction dict (`ekfac_preconditioner` builds it, with
λ̃ = cfg.preconditioner_damping or λ). It is required by ekfac and astra; for sni/lissa it is optional and only
gives the fallback of diverged queries (without one they fall back to their initial iterate).

`batches` is any iterator of minibatches (a `MinibatchSampler` draws them with replacement; `itertools.repeat(b)`
gives the full-batch G). One minibatch is drawn per iteration and shared by all queries still running.
Per-query monitoring, stopping and the trace are in `monitor.py`.

Held-out evaluation (`heldout=`, a batch from `MinibatchSampler.draw` with its own generator, and
`cfg.heldout_every`): the iterate x_k of every running query is measured on that ONE fixed batch B_h at k = 0,
every `heldout_every` iterations and after the last step,

    h_h(x) = ½ xᵀ(G̃_h + λI)x − vᵀx,   r_h(x) = ‖(G̃_h + λI)x − v‖,

the same product the iterations compute, on a batch that never changes, so h_h(x_k) − h_h(x_0) is a difference of
one function (no minibatch noise between the two measurements). It costs (⌈K / every⌉ + 1) extra products on
|B_h| sequences per chunk and changes nothing in the solve: the minibatch stream is untouched and the Fisher
product's label generator is restored around each evaluation (which draws the same labels each time, seeded by
cfg.seed + 1, so the held-out Fisher is fixed too).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from distributed_astra.config import SolverConfig
from distributed_astra.curvature.factors import EkfacFactors
from distributed_astra.curvature.hooks import loss_sequence_mask
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.ekfac import ekfac_inverse
from distributed_astra.ihvp.monitor import (
    DIVERGED,
    EXACT,
    MAX_ITERATIONS,
    RUNNING,
    ConvergenceMonitor,
    HeldoutTrace,
    OnHeldout,
    OnIteration,
    Trace,
    heldout_table,
    trace_table,
)
from distributed_astra.ihvp.products import (
    CurvatureProduct,
    Vectors,
    on_this_rank,
    vec_axpy,
    vec_clone,
    vec_num_queries,
    vec_put,
    vec_scale,
    vec_take,
    vec_to,
)
from distributed_astra.models.lm import IGNORE_INDEX

Preconditioner = Callable[[Vectors], Vectors]
SOLVERS = ("ekfac", "sni", "lissa", "astra")

# [Q, D] vectors (a tensor per tracked module, every module) the iterative solver holds at its fullest besides v,
# the query gradients (counted by tests/test_solver_memory.py): the iterate x and the momentum b of Eq 5 (the
# solver's state, kept across iterations), and the curvature product's result, two at the product's end (its
# per-chunk results and their concatenation, or the sum and its normalised copy) and one after, which the
# iteration turns in place into (G̃_k + λI)x_k, the gradient, its preconditioned image and the momentum's increment.
# Everything else the solver allocates is one module's block at a time (the EK-FAC rotations, rows of v). The
# distributed solve sizes its query pieces by LIVE_VECTORS_PER_QUERY, the planner its memory column.
STATE_VECTORS_PER_QUERY = 2
LIVE_VECTORS_PER_QUERY = STATE_VECTORS_PER_QUERY + 2


# ============================================================================================ settings
@dataclass(frozen=True)
class Sharding:
    """The vectors held here are one rank's share of the modules (module ownership, stages/solve.py): `reduce`
    completes a per-query partial sum over the ranks that hold the other modules (an all-reduce of a [Q] tensor),
    `shapes` lists every module's (out, in+1) in model order, so that random draws consume the generator exactly as
    one rank holding every module would. The default is one rank holding everything."""

    reduce: Callable[[torch.Tensor], torch.Tensor] = on_this_rank
    shapes: Mapping[str, tuple[int, int]] | None = None

    def norm(self, x: Vectors) -> torch.Tensor:
        """Per-query Euclidean norms over every module: Tensor[Q]."""
        return self.reduce(_dot(x, x)).clamp_min(0).sqrt()


WHOLE = Sharding()


def state_storage(cfg: SolverConfig, stat_dtype: torch.dtype) -> torch.dtype:
    """The dtype of v and of the solver's vectors (`solver.state_dtype`): bfloat16, or the statistics' dtype."""
    return torch.bfloat16 if cfg.state_dtype == "bfloat16" else stat_dtype


def step_size(cfg: SolverConfig, damping: float, mu_max: float | None = None) -> float:
    """α: cfg.lr × λ ("relative", seeds Table 3), cfg.lr ("absolute", Fig 3) or cfg.lr / μ̂ ("auto", μ̂ = mu_max)."""
    if cfg.lr_mode == "auto":
        if mu_max is None or not mu_max > 0:
            raise DastraError("solver.lr_mode 'auto' needs the largest eigenvalue of the iteration operator")
        return float(cfg.lr) / float(mu_max)
    if cfg.lr_mode == "relative":
        if not damping > 0:
            raise DastraError(
                f"solver.lr_mode 'relative' sets α = lr × λ, which is 0 with damping {damping}: "
                "use a positive solver.damping or solver.lr_mode=absolute"
            )
        return float(cfg.lr) * float(damping)
    return float(cfg.lr)


def preconditioner_damping(cfg: SolverConfig, damping: float) -> float:
    """λ̃ = cfg.preconditioner_damping, or λ when unset (the paper's choice)."""
    return float(damping) if cfg.preconditioner_damping is None else float(cfg.preconditioner_damping)


def ekfac_preconditioner(
    factors: EkfacFactors, cfg: SolverConfig, damping: float, strategy: str = "ekfac"
) -> Preconditioner:
    """g ↦ (P + λ̃I)⁻¹ g with P = G_EKFAC (or KFAC); λ̃ = λ for the ekfac solver (its answer IS (P + λI)⁻¹ v)."""
    tilde = float(damping) if cfg.name == "ekfac" else preconditioner_damping(cfg, damping)
    return lambda g: ekfac_inverse(factors, g, tilde, strategy)


def largest_eigenvalue(
    product: CurvatureProduct,
    precondition: Preconditioner | None,
    batches: Iterator[Mapping[str, torch.Tensor]],
    damping: float,
    like: Vectors,
    generator: torch.Generator,
    num_batches: int = 3,
    power_iterations: int = 10,
    sharding: Sharding = WHOLE,
) -> float:
    """μ̂: the largest eigenvalue of M_k = (P + λ̃I)⁻¹(G̃_k + λI) (M_k = G̃_k + λI without `precondition`), the max
    over `num_batches` minibatches of `power_iterations` power steps from a random start each.

    M_k is similar to the symmetric (P + λ̃I)^{-1/2}(G̃_k + λI)(P + λ̃I)^{-1/2}, so its eigenvalues are real and
    positive and the norm ratio ‖M z‖/‖z‖ of the power iterate converges to the largest from below.
    """
    estimate = 0.0
    for _ in range(num_batches):
        batch = next(batches)
        shapes = sharding.shapes or {k: tuple(t.shape[1:]) for k, t in like.items()}
        z = {}
        for k, shape in shapes.items():  # every module's draw in model order; the ones held here are kept
            draw = torch.randn((1, *shape), generator=generator, dtype=torch.float64)
            if k in like:
                z[k] = draw.to(device=like[k].device, dtype=like[k].dtype)
        z = vec_scale(1.0 / float(sharding.norm(z)[0]), z)
        ratio = torch.zeros(())
        for _ in range(power_iterations):
            mz = vec_axpy(damping, z, product.product(z, batch))
            if precondition is not None:
                mz = precondition(mz)
            ratio = sharding.norm(mz)[0]
            if not bool(torch.isfinite(ratio)) or float(ratio) == 0.0:
                raise DastraError(
                    f"the curvature operator's power iteration gave {float(ratio)}: check the factors and the model "
                    "for NaN/Inf, or use solver.lr_mode=absolute"
                )
            z = vec_scale(1.0 / float(ratio), mz)
        estimate = max(estimate, float(ratio))
    return estimate


# ============================================================================================ minibatches
class MinibatchSampler:
    """An endless iterator of minibatches of `minibatch_size` sequences drawn uniformly WITH replacement.

    `sequences` is one batch dict or an iterable of batch dicts in the format of `models/lm.py` (input_ids,
    attention_mask, labels of shape [B, T], right-padded; other per-row tensors such as doc_id are carried along).
    Their rows are pooled; rows that carry no loss (no label after the shift) are dropped, since they add nothing
    to G and are not counted in N_B, so every drawn row counts and G̃ is an unbiased estimate of
    G = (1/N) Σ_n J_nᵀ H_n J_n over the N loss-carrying sequences. Drawn rows are right-padded to a common width
    (attention_mask 0, labels -100) and trailing all-padding columns are trimmed.

    The draws depend only on `generator` (a CPU generator), so two samplers seeded alike give the same sequence.
    """

    def __init__(
        self,
        sequences: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
        minibatch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if minibatch_size < 1:
            raise DastraError(f"solver.minibatch_size must be >= 1, got {minibatch_size}")
        batches = [sequences] if isinstance(sequences, Mapping) else list(sequences)
        if not batches:
            raise DastraError("no curvature sequences: the minibatch sampler needs at least one batch")
        self.minibatch_size = int(minibatch_size)
        self.generator = generator
        self._rows = self._pool(batches)
        self.num_sequences = int(self._rows["input_ids"].shape[0])
        self.last_indices: torch.Tensor | None = None

    @staticmethod
    def _pool(batches: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batches[0]:
                raise DastraError(f"curvature batch has no '{key}' (keys: {sorted(batches[0])})")
        rows_first = batches[0]["input_ids"].shape[0]
        keys = [k for k, t in batches[0].items() if isinstance(t, torch.Tensor) and t.dim() >= 1
                and t.shape[0] == rows_first]
        width = max(int(b["input_ids"].shape[1]) for b in batches)
        pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
        pooled: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for b in batches:
            keep = loss_sequence_mask(b["labels"])
            for k in keys:
                t = b[k]
                if k in pad and t.shape[1] < width:
                    t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad[k])
                pooled[k].append(t[keep])
        rows = {k: torch.cat(v) for k, v in pooled.items()}
        if rows["input_ids"].shape[0] == 0:
            raise DastraError(
                "no curvature sequence carries a loss (every label is -100 after the shift): "
                "the minibatches need sequences of at least two real tokens"
            )
        return rows

    def _collate(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {k: t.index_select(0, index) for k, t in self._rows.items()}
        real = batch["attention_mask"].ne(0).any(dim=0) | batch["labels"].ne(IGNORE_INDEX).any(dim=0)
        width = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
        for k in ("input_ids", "attention_mask", "labels"):
            batch[k] = batch[k][:, :width]
        return batch

    def sample(self) -> dict[str, torch.Tensor]:
        """One minibatch of `minibatch_size` rows drawn with replacement."""
        index = torch.randint(self.num_sequences, (self.minibatch_size,), generator=self.generator)
        self.last_indices = index
        return self._collate(index)

    def draw(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`size` rows drawn with replacement by `generator`, leaving this sampler's own stream untouched (the
        solvers' fixed held-out batch)."""
        if size < 1:
            raise DastraError(f"solver.heldout_batch_size must be >= 1, got {size}")
        return self._collate(torch.randint(self.num_sequences, (int(size),), generator=generator))

    def full_batch(self) -> dict[str, torch.Tensor]:
        """Every loss-carrying sequence once (its product is the full G = (1/N) Σ_n J_nᵀ H_n J_n)."""
        return self._collate(torch.arange(self.num_sequences))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.sample()


def full_batches(sequences: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]):
    """An endless iterator yielding the full batch of every loss-carrying sequence (deterministic G̃ = G)."""
    return itertools.repeat(MinibatchSampler(sequences, 1).full_batch())


# ============================================================================================ result
@dataclass
class SolveResult:
    """x: the solved directions ({module: [Q, out, in+1]}, in v's dtype and device).

    status[q]: "exact" (ekfac), "converged", "max_iterations" or "diverged" (then x[q] is the EK-FAC solution and
    fell_back[q] is True). iterations[q]: iterations run for q (summed over LiSSA repeats). trace: the monitor's
    rows; `table()` gives the pyarrow.Table for trace.parquet. messages: the divergence warnings.
    heldout: the held-out evaluation's rows (empty without a held-out batch), `heldout_table()` for
    heldout.parquet; heldout_seconds: the wall time those evaluations took.
    """

    x: Vectors
    status: list[str]
    fell_back: torch.Tensor
    iterations: list[int]
    trace: Trace
    messages: list[str]
    heldout: HeldoutTrace = field(default_factory=HeldoutTrace)
    heldout_seconds: float = 0.0

    def table(self):
        return trace_table(self.trace)

    def heldout_table(self):
        return heldout_table(self.heldout)


class HeldoutEvaluator:
    """h and the residual of iterates on one fixed curvature batch (module docstring), into a `HeldoutTrace`.

    `evaluate(x, v, index, iteration, repeat, step)` measures the iterates x of the queries `index` (one row of x per
    entry of `index`, ascending) against their rows of the right-hand sides v (all Q rows), records them at `iteration` (steps taken) and calls
    `on_heldout(step, h[Q], r[Q])` with NaN for the queries not measured.
    """

    def __init__(
        self, product: CurvatureProduct, batch: Mapping[str, torch.Tensor], damping: float, every: int,
        num_queries: int, query_ids: Sequence[str], seed: int, on_heldout: OnHeldout | None = None,
        sharding: Sharding = WHOLE,
    ) -> None:
        self.product = product
        self.sharding = sharding
        self.batch = batch
        self.damping = damping
        self.every = int(every)
        self.num_queries = num_queries
        self.query_ids = list(query_ids)
        self.seed = seed
        self.on_heldout = on_heldout
        self.trace = HeldoutTrace()
        self.seconds = 0.0

    def due(self, k: int) -> bool:
        return self.every > 0 and k % self.every == 0

    def _product(self, x: Vectors) -> Vectors:
        generator = getattr(self.product, "generator", None)  # the Fisher product's labels: fixed, and restored
        if not isinstance(generator, torch.Generator):
            return self.product.product(x, self.batch)
        state = generator.get_state()
        generator.manual_seed(self.seed + 1)
        try:
            return self.product.product(x, self.batch)
        finally:
            generator.set_state(state)

    def evaluate(self, x: Vectors, v: Vectors, index: torch.Tensor, iteration: int, repeat: int, step: int) -> None:
        if index.numel() == 0:
            return
        started = time.perf_counter()
        ax = self._product(x)
        for name, t in ax.items():  # in place: (G̃_h + λI) x, then its residual against v
            t.add_(x[name] * self.damping)
        h = self.sharding.reduce(0.5 * _dot(x, ax) - _dot_rows(v, index, x)).detach().double().cpu()
        _sub_rows(ax, v, index)
        r = self.sharding.norm(ax).detach().double().cpu()
        del ax
        self.seconds += time.perf_counter() - started
        for j, q in enumerate(index.cpu().tolist()):
            self.trace.query.append(q)
            self.trace.query_id.append(self.query_ids[q])
            self.trace.repeat.append(repeat)
            self.trace.iteration.append(iteration)
            self.trace.objective.append(float(h[j]))
            self.trace.residual.append(float(r[j]))
        if self.on_heldout is not None:
            full_h = torch.full((self.num_queries,), math.nan, dtype=torch.float64)
            full_r = torch.full_like(full_h, math.nan)
            full_h[index.cpu()], full_r[index.cpu()] = h, r
            self.on_heldout(step, full_h, full_r)


# ============================================================================================ in-place arithmetic
def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (ascending, distinct) of one module's block: a view when they are the first len(index) rows."""
    count = index.numel()
    if count == 0 or int(index[-1]) == count - 1:
        return t[:count]
    return t.index_select(0, index.to(t.device))


def _accumulate(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least: dot products of bfloat16 storage are summed in float32 (a no-op otherwise)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """Per-query Σ_modules ⟨x_q, y_q⟩ (`vec_dot`'s sum, in float32 at least)."""
    total = None
    for name, t in x.items():
        d = (_accumulate(t) * _accumulate(y[name])).flatten(1).sum(dim=1)
        total = d if total is None else total + d
    return total


def _dot_rows(v: Vectors, index: torch.Tensor, x: Vectors) -> torch.Tensor:
    """Per-query ⟨v_q, x_q⟩ for the queries `index` of v and the rows of x, one module's rows of v at a time."""
    total = None
    for name, t in v.items():
        d = (_accumulate(_rows(t, index)) * _accumulate(x[name])).flatten(1).sum(dim=1)
        total = d if total is None else total + d
    return total


def _sub_rows(x: Vectors, v: Vectors, index: torch.Tensor) -> None:
    """In place: x ← x − v[index], one module's rows of v at a time."""
    for name, t in x.items():
        t.sub_(_rows(v[name], index))


# ============================================================================================ solve
def solve(
    v: Vectors,
    preconditioner: Preconditioner | None,
    product: CurvatureProduct | None,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    cfg: SolverConfig,
    damping: float,
    *,
    x0: Vectors | None = None,
    query_ids: Sequence[str] | None = None,
    on_iteration: OnIteration | None = None,
    heldout: Mapping[str, torch.Tensor] | None = None,
    on_heldout: OnHeldout | None = None,
    vector_dtype: torch.dtype | None = None,
    sharding: Sharding = WHOLE,
) -> SolveResult:
    """Solve (G + λI) x = v for every query (see the module docstring); λ = `damping` (a number: resolve "auto"
    with `default_damping(factors)` first).

    x0 overrides the initial iterate (default: v for sni/lissa, (P + λ̃I)⁻¹ v for astra).
    query_ids name the queries in the trace and in divergence messages (default: their indices).
    on_iteration(iteration, h[Q], residual[Q], lr) is called once per iteration (NaN for stopped queries); for
    lissa, `iteration` counts across repeats.
    heldout: a fixed curvature batch (`MinibatchSampler.draw`) on which the iterates are measured at the start,
    every cfg.heldout_every iterations and at the end (module docstring; nothing when cfg.heldout_every is 0);
    on_heldout(iteration, h[Q], residual[Q]) receives each evaluation (NaN for queries not measured).
    vector_dtype: the storage of v, of the iterate, of the momentum and of the product's result (default: v's
    dtype); torch.bfloat16 halves the solver's LIVE_VECTORS_PER_QUERY [Q, D] vectors against float32. The
    preconditioner still runs in the factors' dtype and the dot products (h, residuals) are summed in float32 at
    least; each update rounds to vector_dtype, so the answer is as accurate as that dtype holds it.
    sharding: v holds this rank's modules only (`Sharding`); the product must then return those modules' blocks
    of the full G̃·v. Every per-query scalar (h, residuals, the power iteration's norms) is completed over the
    ranks, so every rank takes the same decisions and the blocks equal one rank's.

    Memory: the updates are in place; besides v the iterative solvers hold at most LIVE_VECTORS_PER_QUERY [Q, D]
    vectors (the x and b of Eq 5 and the product's result), plus one module's block at a time; LiSSA with
    cfg.lissa_repeats > 1 also keeps the running total of Alg 1.
    """
    if cfg.name not in SOLVERS:
        raise DastraError(f"solver.name '{cfg.name}' is not one of: {', '.join(SOLVERS)}")
    damping = float(damping)
    if not damping >= 0:
        raise DastraError(f"solver.damping must be a non-negative number, got {damping}")
    num_queries = vec_num_queries(v)
    if vector_dtype is not None:
        v = vec_to(v, dtype=vector_dtype)
    dtype = next(iter(v.values())).dtype
    device = next(iter(v.values())).device

    def precondition_into(g: Vectors, out: Vectors) -> Vectors:
        """out ← (P + λ̃I)⁻¹ g module by module (P is block-diagonal over the modules, Eq 26), in out's dtype;
        out may be g itself."""
        for name, t in g.items():
            out[name].copy_(preconditioner({name: t})[name])
        return out

    def ekfac_solution() -> Vectors:
        return precondition_into(v, {name: torch.empty_like(t) for name, t in v.items()})

    if cfg.name in ("ekfac", "astra") and preconditioner is None:
        raise DastraError(f"solver '{cfg.name}' needs the EK-FAC preconditioner: fit the factors first (`dastra fit`)")

    if cfg.name == "ekfac":
        return SolveResult(
            ekfac_solution(), [EXACT] * num_queries, torch.zeros(num_queries, dtype=torch.bool), [0] * num_queries,
            Trace(), [],
        )
    if product is None or batches is None:
        raise DastraError(f"solver '{cfg.name}' needs a curvature product and minibatches")

    repeats = cfg.lissa_repeats if cfg.name == "lissa" else 1
    if x0 is not None:
        init = vec_to(x0, device=device, dtype=dtype)
    elif cfg.name == "astra":
        init = ekfac_solution()
    else:
        init = v
    owned = x0 is None and cfg.name == "astra"  # the iterate may start in init's own storage
    # the fallback of diverged queries is the EK-FAC solution, recomputed at the end; init only without one
    keep_init = repeats > 1 or preconditioner is None

    iterator = iter(batches)
    precond_step = (lambda g: precondition_into(g, g)) if cfg.name == "astra" else None
    mu_max = None
    if cfg.lr_mode == "auto":
        probe = torch.Generator().manual_seed(cfg.seed)
        precond_probe = (lambda g: vec_to(preconditioner(g), device=device, dtype=dtype)) if precond_step else None
        mu_max = largest_eigenvalue(product, precond_probe, iterator, damping, v, probe, sharding=sharding)
    alpha = step_size(cfg, damping, mu_max)
    lr_setting = {
        "relative": f" (now solver.lr = {cfg.lr:g}, α = lr × λ = {alpha:.3g})",
        "absolute": f" (now solver.lr = α = {alpha:.3g})",
        "auto": f" (now solver.lr = {cfg.lr:g}, α = lr / μ̂ = {alpha:.3g})",
    }[cfg.lr_mode]
    monitor = ConvergenceMonitor(
        num_queries,
        cfg.tolerance,
        cfg.patience,
        cfg.iterations,
        solver=cfg.name,
        lr_setting=lr_setting,
        query_ids=query_ids,
        on_iteration=on_iteration,
    )
    evaluator = None
    if heldout is not None and cfg.heldout_every > 0:
        evaluator = HeldoutEvaluator(
            product, heldout, damping, cfg.heldout_every, num_queries, monitor.query_ids, cfg.seed, on_heldout,
            sharding,
        )

    total: Vectors | None = None  # Alg 1's sum over the repeats (the iterate itself when R = 1)
    for repeat in range(repeats):
        monitor.start_repeat(repeat)
        alive = [q for q in range(num_queries) if monitor.status[q] != DIVERGED]
        for q in alive:
            monitor.status[q] = RUNNING
        if not alive:
            break
        x = init if owned else vec_clone(init)
        if not keep_init:
            del init
        ran_before = list(monitor.iterations)
        if cfg.iterations == 0:
            for q in alive:
                monitor.status[q] = MAX_ITERATIONS
        else:
            _iterate(
                x, v, torch.tensor(alive, dtype=torch.long), product, iterator, precond_step, cfg, damping, alpha,
                monitor, step_offset=repeat * cfg.iterations, evaluator=evaluator, repeat=repeat, sharding=sharding,
            )
        if evaluator is not None:  # the final iterate of every query that did not diverge, at its step count
            offset = repeat * cfg.iterations
            by_steps: dict[int, list[int]] = {}
            for q in alive:
                if monitor.status[q] != DIVERGED:
                    by_steps.setdefault(monitor.iterations[q] - ran_before[q], []).append(q)
            for steps, members in sorted(by_steps.items()):
                index = torch.tensor(members, dtype=torch.long)
                evaluator.evaluate(vec_take(x, index), v, index, steps, repeat, offset + steps)
        if total is None:
            total = x
        else:
            for name, t in total.items():
                t.add_(x[name])
        del x

    diverged = torch.tensor([s == DIVERGED for s in monitor.status], dtype=torch.bool)
    x = total
    if repeats > 1:
        for t in x.values():
            t.mul_(1.0 / repeats)
    if bool(diverged.any()):
        index = diverged.nonzero().squeeze(1)
        vec_put(x, index, vec_take(ekfac_solution() if preconditioner is not None else init, index))
    return SolveResult(
        x, list(monitor.status), diverged, list(monitor.iterations), monitor.trace, monitor.messages,
        evaluator.trace if evaluator is not None else HeldoutTrace(), evaluator.seconds if evaluator is not None else 0.0,
    )


def _iterate(
    x: Vectors,
    v: Vectors,
    index: torch.Tensor,
    product: CurvatureProduct,
    batches: Iterator[Mapping[str, torch.Tensor]],
    precondition: Callable[[Vectors], Vectors] | None,
    cfg: SolverConfig,
    damping: float,
    alpha: float,
    monitor: ConvergenceMonitor,
    step_offset: int,
    evaluator: HeldoutEvaluator | None = None,
    repeat: int = 0,
    sharding: Sharding = WHOLE,
) -> None:
    """Run up to cfg.iterations SGD steps (Eq 3 / Eq 5 with heavy ball) on the queries `index` (ascending) of x, in
    place; the monitor stops queries; `precondition` maps a direction dict onto (P + λ̃I)⁻¹ of it in its own storage.
    `evaluator` measures the iterates of the running queries on its held-out batch when `evaluator.due(k)`.

    The running queries occupy the first rows of x (their relative order kept), so the product reads them as a
    view: `order[p]` is the query in row p, and x is put back in query order at the end. Per iteration the product's
    result w becomes, in place, (G̃_k + λI)x_k, then ∇h = (G̃_k + λI)x_k − v, then d_k = (P + λ̃I)⁻¹∇h (astra);
    b_k = μ b_{k−1} + d_k (b_0 = d_0) and x ← x − α_k b_k.
    """
    momentum = float(cfg.momentum)
    num_queries = vec_num_queries(x)
    order = torch.cat([index, _complement(index, num_queries)])
    running = index.numel()
    if running < num_queries:  # the running queries first
        _permute_rows(x, order)
    buf: Vectors | None = None
    for k in range(cfg.iterations):
        if running == 0:
            break
        index = order[:running]
        lr = alpha * cfg.lr_decay ** (k // cfg.lr_decay_every)
        try:
            batch = next(batches)
        except StopIteration:
            raise DastraError(
                f"the curvature minibatches ran out after {step_offset + k} iterations: pass an endless sampler "
                "(MinibatchSampler) or enough minibatches for solver.iterations"
            ) from None
        xk = {name: t[:running] for name, t in x.items()}
        if evaluator is not None and evaluator.due(k):
            evaluator.evaluate(xk, v, index, k, repeat, step_offset + k)
        w = product.product(xk, batch)
        for name, t in w.items():
            t.add_(xk[name] * damping)  # (G̃_k + λI) x_k
        h = sharding.reduce(0.5 * _dot(xk, w) - _dot_rows(v, index, xk))
        _sub_rows(w, v, index)  # ∇h(x_k) on minibatch k
        stop = monitor.update(
            k, index, h, sharding.norm(w), lr, step=step_offset + k, last=(k == cfg.iterations - 1)
        )
        if precondition is not None:
            w = precondition(w)
        if buf is None or momentum == 0:
            buf = w
        else:
            for name, t in buf.items():
                t.mul_(momentum).add_(w[name])
        del w
        for name, t in xk.items():
            t.add_(buf[name] * -lr)
        if bool(stop.any()):
            keep = (~stop).nonzero().squeeze(1)
            perm = torch.cat([keep, stop.nonzero().squeeze(1)])
            for name, t in xk.items():
                t.copy_(t.index_select(0, perm.to(t.device)))
            order[:running] = order[:running].index_select(0, perm)
            for name, t in buf.items():
                buf[name] = t.index_select(0, keep.to(t.device))
            running = keep.numel()
    del buf
    if not bool(order.eq(torch.arange(num_queries)).all()):  # back in query order
        _permute_rows(x, torch.argsort(order))


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    """0..size−1 without `index`, ascending."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[index] = False
    return mask.nonzero().squeeze(1)


def _permute_rows(x: Vectors, order: torch.Tensor) -> None:
    """In place, one module at a time: row p of x becomes its row order[p]."""
    for t in x.values():
        t.copy_(t.index_select(0, order.to(t.device)))
