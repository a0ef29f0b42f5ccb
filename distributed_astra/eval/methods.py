"""Attribution methods for the LDS harness, in a registry keyed by name (seeds §1, §8).

A method is a `Method`: a name, a table label, and `score(model, settings) -> Tensor[Q, N]`, the score τ(z_m, z_q)
of every training example m for every query q of ONE trained model. Ensembles average these over models, each with
its own factors and iHVPs (seeds §1 Eq 11, §13.11). Sign convention everywhere (docs/design.md): positive = helpful,
i.e. removing z_m is predicted to INCREASE the query's measurement f.

    graddot  ∇f_qᵀ ∇L_m                                   (IF with G + λI = I)
    tracin   Σ_c η_c ∇f_q(θ_c)ᵀ ∇L_m(θ_c)                 over the recipe's checkpoints (SOURCE Eq 29)
    trak     (Pᵀ∇f_q)ᵀ (ΦᵀΦ)⁻¹ (Pᵀ∇L_m),  Φ = [Pᵀ∇out(z_n)]_n, P a Gaussian projection to k dims (TRAK, §8)
    ekfac    ∇f_qᵀ (G_EKFAC + λI)⁻¹ ∇L_m                  (`ihvp.ekfac_inverse`)
    sni      the SNI iHVP (`ihvp.solve`, name sni, x0 = ∇f)
    astra    the ASTRA iHVP (`ihvp.solve`, name astra, x0 = EK-FAC solution, EK-FAC-preconditioned; Eq 5)

More methods join with `register_method(Method(...))`: eval/source_methods.py adds SOURCE and ASTRA-SOURCE
(imported by eval/lds.py, which reads the registry).

TRAK's output function is the margin for classification (then ∇L_m = −(1 − p_m)∇margin_m exactly, which is TRAK's
Q weighting), the regression output g (Φᵀ Φ is then the projected GGN), and the sequence loss for the language
model (TRAK has no LM recipe; the paper omits it there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from distributed_astra.config import (
    Config,
    EvalConfig,
    SolverConfig,
    SourceConfig,
    eval_solver,
)
from distributed_astra.curvature.covariance import collect_covariances, model_device
from distributed_astra.curvature.eigen import (
    collect_eigenvalue_correction,
    eigendecompose,
)
from distributed_astra.curvature.factors import EkfacFactors, build_factors
from distributed_astra.errors import DastraError
from distributed_astra.eval.tasks import State, Task, TrainedModel
from distributed_astra.ihvp.ekfac import ekfac_inverse, mean_eigenvalue
from distributed_astra.ihvp.products import CurvatureProduct, GGNProduct, Vectors
from distributed_astra.ihvp.solvers import ekfac_preconditioner, solve
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.scoring.gradients import Objective, example_gradients

STAT_DTYPE = torch.float64
GRADIENT_BATCH = 64


def pair_scores(directions: Vectors, train: Vectors) -> torch.Tensor:
    """[Q, N] = Σ_modules ⟨X_q, ∇L_m⟩ for directions X [Q, out, in+1] and training gradients [N, out, in+1]."""
    return sum(torch.einsum("qoi,noi->qn", directions[n], train[n].to(directions[n].dtype)) for n in directions)


def flatten(x: Vectors) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in x.values()], dim=1)


class ModelAttribution:
    """One trained model of the ensemble and everything the methods share: gradients, factors, products."""

    def __init__(self, task: Task, trained: TrainedModel, seed: int) -> None:
        self.task = task
        self.trained = trained
        self.seed = seed
        self.model = task.attribution_model(trained.checkpoints[-1])
        self.tracked = select_tracked_modules(self.model, task.tracked_modules)

    def at_checkpoint(self, state: State) -> ModelAttribution:
        return ModelAttribution(self.task, TrainedModel([state], [1.0], self.trained.final_loss), self.seed)

    def gradients(self, batches: list[dict[str, torch.Tensor]], objective: Objective) -> Vectors:
        """∇θ objective(z_n) of every example of `batches`, {module: [N, out, in+1]} (`scoring.example_gradients`)."""
        task = self.task.attribution_task
        return example_gradients(self.model, self.tracked, batches, STAT_DTYPE, task=task, objective=objective)

    @cached_property
    def train_gradients(self) -> Vectors:
        """∇L(z_m) of every training example at θ^s."""
        return self.gradients(self.task.train_batches(GRADIENT_BATCH), self.task.attribution_task.loss)

    @cached_property
    def query_gradients(self) -> Vectors:
        """∇f(z_q) of every query at θ^s (f = the task's measurement)."""
        return self.gradients(self.task.query_batches(GRADIENT_BATCH), self.task.attribution_task.measurement)

    @cached_property
    def factors(self) -> EkfacFactors:
        """EK-FAC over the whole training set with targets sampled by the attribution task (seeds §3): the two
        passes of `curvature.fit_ekfac`, labels from one generator seeded with the model's seed."""
        task = self.task.attribution_task
        generator = torch.Generator(device=model_device(self.model)).manual_seed(self.seed)
        batches = self.task.train_batches(GRADIENT_BATCH)
        cov = collect_covariances(self.model, self.tracked, batches, STAT_DTYPE, generator, task=task)
        eigens = eigendecompose(cov)
        lam = collect_eigenvalue_correction(self.model, self.tracked, eigens, batches, STAT_DTYPE, generator, task=task)
        return build_factors(cov, eigens, lam)

    def damping(self, scale: float) -> float:
        """λ = scale × mean(Λ) (scale 0.1 = the solver's `auto`), or the task's exact λ (ridge)."""
        if self.task.exact_damping is not None:
            return float(self.task.exact_damping)
        return scale * mean_eigenvalue(self.factors)

    def top_eigenvalue(self, operator: Callable[[Vectors], Vectors], iterations: int = 30) -> float:
        """The dominant eigenvalue of `operator` (a full-training-set curvature map) by power iteration."""
        generator = torch.Generator().manual_seed(self.seed)
        v = {n: torch.randn(1, *t.shape, generator=generator, dtype=STAT_DTYPE) for n, t in self.tracked.items()}
        value = 0.0
        for _ in range(iterations):
            norm = float(flatten(v).norm())
            v = operator({n: t / norm for n, t in v.items()})
            value = float(flatten(v).norm())
        return value

    @cached_property
    def full_batch(self) -> dict[str, torch.Tensor]:
        return self.sampler(1).full_batch()

    def product(self) -> CurvatureProduct:
        """The exact GGN product with the attribution task's output Hessian."""
        return GGNProduct(self.model, self.tracked, task=self.task.attribution_task)

    def sampler(self, minibatch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        return self.task.curvature_sampler(self.task.train_batches(GRADIENT_BATCH), minibatch_size, generator)


@dataclass(frozen=True)
class MethodSettings:
    """What a method may depend on: the run's config (its `eval` section; `source` for the SOURCE methods' number of
    segments; the solver settings of `eval_solver`) and the damping multiplier of this run (the λ sweep)."""

    cfg: Config
    damping_scale: float

    @property
    def eval(self) -> EvalConfig:
        return self.cfg.eval

    @property
    def source(self) -> SourceConfig:
        return self.cfg.source

    @property
    def solver(self) -> SolverConfig:
        """The harness's solver settings before a method's name and step (`config.eval_solver`)."""
        return eval_solver(self.cfg)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    score: Callable[[ModelAttribution, MethodSettings], torch.Tensor]
    uses_damping: bool = False
    uses_segments: bool = False  # SOURCE: depends on source.num_segments


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise DastraError(f"attribution method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`; an unknown name raises `DastraError` listing the valid ones."""
    if name not in METHODS:
        raise DastraError(f"attribution method '{name}' is unknown; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


# ==================================================================================================== baselines
def graddot_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    return pair_scores(ctx.query_gradients, ctx.train_gradients)


def tracin_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    total = None
    for state, rate in zip(ctx.trained.checkpoints, ctx.trained.learning_rates):
        at = ctx.at_checkpoint(state)
        part = rate * pair_scores(at.query_gradients, at.train_gradients)
        total = part if total is None else total + part
    return total


def trak_projection(dim: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """P [D, k]: i.i.d. N(0, 1/k) entries (a JL projection), a fresh one per ensemble member."""
    generator = torch.Generator().manual_seed(10_007 * (seed + 1))
    return torch.randn(dim, k, generator=generator, dtype=dtype) / math.sqrt(k)


def trak_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    """TRAK with one random projection per model: k = min(eval.trak_dim, N // 2) keeps ΦᵀΦ well posed; no damping."""
    task = ctx.task
    out_grads = flatten(ctx.gradients(task.train_batches(GRADIENT_BATCH), task.model_output))
    k = max(1, min(settings.eval.trak_dim, task.num_train // 2))
    projection = trak_projection(out_grads.shape[1], k, ctx.seed, out_grads.dtype)
    phi = out_grads @ projection
    kernel = phi.T @ phi
    query = flatten(ctx.query_gradients) @ projection
    train = flatten(ctx.train_gradients) @ projection
    return query @ torch.linalg.solve(kernel, train.T)


# ==================================================================================================== IF methods
def solver_config(settings: MethodSettings, name: str, top: float | None = None, damping: float = 0.0) -> SolverConfig:
    """The LDS's solver settings for method `name`: each method's step, explicitly.

        astra, astra-source   eval.solver.lr read as eval.solver.lr_mode (default: absolute α = 0.01)
        sni                   absolute α = eval.sni_lr / (σ_max(G) + λ), `top` = σ_max(G) of the full training set

    Everything else (iterations, ℬ, momentum, decay, tolerance, ...) is `eval_solver`'s, as for `eval facts`."""
    if name == "sni":
        if top is None:
            raise DastraError("SNI-IF's step needs σ_max(G) of the training set (ModelAttribution.top_eigenvalue)")
        return eval_solver(settings.cfg, name=name, lr=settings.eval.sni_lr / (top + damping), lr_mode="absolute")
    return eval_solver(settings.cfg, name=name)


def ekfac_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    damping = ctx.damping(settings.damping_scale)
    return pair_scores(ekfac_inverse(ctx.factors, ctx.query_gradients, damping), ctx.train_gradients)


def sni_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    """SNI from x0 = ∇f with α = eval.sni_lr / (σ_max(G) + λ) (Koh & Liang scale G below 1 the same way; with
    heavy-ball momentum μ the full-batch iteration is stable for α(σ + λ) < 2(1 + μ)). No EK-FAC fallback: a
    diverged query falls back to ∇f, i.e. to grad-dot."""
    damping = ctx.damping(settings.damping_scale)
    product = ctx.product()
    top = ctx.top_eigenvalue(lambda v: product.product(v, ctx.full_batch))
    cfg = solver_config(settings, "sni", top, damping)
    result = solve(ctx.query_gradients, None, ctx.product(), ctx.sampler(cfg.minibatch_size), cfg, damping)
    return pair_scores(result.x, ctx.train_gradients)


def astra_scores(ctx: ModelAttribution, settings: MethodSettings) -> torch.Tensor:
    """ASTRA (seeds Eq 5) from the EK-FAC solution, λ̃ = λ, absolute step α = eval.solver.lr (0.01) with momentum and
    the ×lr_decay schedule. A step scaled to the stability bound of (P + λI)⁻¹(G + λI) was tried and is worse: on
    minibatches of ℬ = 64 the iterate then sits at a noise floor far from the exact iHVP (docs/results/lds.md)."""
    damping = ctx.damping(settings.damping_scale)
    cfg = solver_config(settings, "astra")
    preconditioner = ekfac_preconditioner(ctx.factors, cfg, damping)
    result = solve(ctx.query_gradients, preconditioner, ctx.product(), ctx.sampler(cfg.minibatch_size), cfg, damping)
    return pair_scores(result.x, ctx.train_gradients)


for _method in (
    Method("graddot", "grad-dot", graddot_scores),
    Method("tracin", "TracIn", tracin_scores),
    Method("trak", "TRAK", trak_scores),
    Method("ekfac", "EK-FAC-IF", ekfac_scores, uses_damping=True),
    Method("sni", "SNI-IF", sni_scores, uses_damping=True),
    Method("astra", "ASTRA-IF", astra_scores, uses_damping=True),
):
    register_method(_method)
