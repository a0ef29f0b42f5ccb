"""SOURCE rows of the LDS harness (seeds §6-7): EK-FAC-SOURCE (exp-form and damped r̄) and ASTRA-SOURCE.

    ekfac-source          Σ_ℓ ∇fᵀ S̄⋯ r̄_ℓ, r̄ in the exp form, EK-FAC averaged over each segment's checkpoints
    ekfac-source-damped   the same with r̃ = (Ḡ_ℓ + λ_ℓI)⁻¹ (= ASTRA-SOURCE with 0 iterations)
    astra-source          r̃ solved by ASTRA per segment, G̃ at the segment's averaged weights (seeds §7, option 3)
    ekfac-source-lambda   EK-FAC-IF at θ^s with SOURCE's IF-comparable damping Σ_ℓ K_ℓλ_ℓ / Σ_ℓ K_ℓ (seeds §10.2):
                          separates SOURCE's damping from its trajectory averaging

L = `source.num_segments` (the papers' 3). The damping is SOURCE's own, λ_ℓ = 1/(η_eff K_ℓ) + weight decay, so these rows
ignore the harness's damping sweep. The trajectory is rebuilt exactly from a tabular task's recipe (constant
learning rate, heavy-ball SGD, one checkpoint every epochs/num_checkpoints epochs, the last num_checkpoints kept);
tasks whose training does not follow that recipe need a recorded `source.Trajectory` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distributed_astra.curvature.factors import EkfacFactors
from distributed_astra.errors import DastraError
from distributed_astra.eval.methods import (
    Method,
    MethodSettings,
    ModelAttribution,
    pair_scores,
    register_method,
    solver_config,
)
from distributed_astra.eval.tasks import TabularTask
from distributed_astra.ihvp.ekfac import ekfac_inverse
from distributed_astra.ihvp.products import Vectors
from distributed_astra.source import (
    CheckpointRecord,
    OptimizerSettings,
    Segment,
    Trajectory,
    astra_source_directions,
    average_ekfac,
    average_states,
    if_damping,
    segment_trajectory,
    source_directions,
    source_scores,
)


def tabular_trajectory(ctx: ModelAttribution) -> Trajectory:
    """The trajectory of `ctx`'s model (trained on all N examples) from its tabular recipe (module docstring)."""
    task = ctx.task
    if not isinstance(task, TabularTask):
        raise DastraError(
            f"SOURCE on task '{task.name}' needs a recorded trajectory (source.TrajectoryRecorder); only the "
            "tabular recipes can be rebuilt from their settings"
        )
    spec = task.recipe_spec
    per_epoch = math.ceil(task.num_train / spec.batch_size)
    every = max(1, spec.epochs // spec.num_checkpoints)
    epochs = [e + 1 for e in range(spec.epochs) if (e + 1) % every == 0 or e + 1 == spec.epochs]
    epochs = epochs[-spec.num_checkpoints :]
    if len(epochs) != len(ctx.trained.checkpoints):
        raise DastraError(
            f"task '{task.name}': {len(ctx.trained.checkpoints)} checkpoints, the recipe implies {len(epochs)}"
        )
    return Trajectory(
        OptimizerSettings("sgd", spec.momentum, spec.weight_decay),
        spec.batch_size,
        task.num_train,
        [spec.lr] * (spec.epochs * per_epoch),
        [CheckpointRecord(e * per_epoch, f"epoch{e}") for e in epochs],
        states=list(ctx.trained.checkpoints),
    )


@dataclass
class SegmentParts:
    segments: list[Segment]
    factors: list[EkfacFactors]  # segment-averaged EK-FAC
    train_gradients: list[list[Vectors]]  # per segment, per checkpoint: ∇L(θ_c, z_m) of every training example
    averaged: list[ModelAttribution]  # the model at θ̄_ℓ (ASTRA-SOURCE's G̃)


def segment_parts(ctx: ModelAttribution, num_segments: int) -> SegmentParts:
    """Everything SOURCE needs from `ctx`'s trajectory cut into `num_segments` segments, computed once per model
    and number of segments and kept on `ctx`."""
    cache = ctx.__dict__.setdefault("_source_parts", {})
    if num_segments in cache:
        return cache[num_segments]
    traj = tabular_trajectory(ctx)
    segments = segment_trajectory(traj, num_segments)
    factors, grads, averaged = [], [], []
    for seg in segments:
        at = [ctx.at_checkpoint(traj.state(i)) for i in seg.checkpoints]
        factors.append(average_ekfac([a.factors for a in at]))
        grads.append([a.train_gradients for a in at])
        averaged.append(ctx.at_checkpoint(average_states([traj.state(i) for i in seg.checkpoints])))
    parts = SegmentParts(segments, factors, grads, averaged)
    cache[num_segments] = parts
    return parts


def ekfac_source_scores(ctx: ModelAttribution, settings: MethodSettings, variant: str = "exp"):
    parts = segment_parts(ctx, settings.source.num_segments)
    directions = source_directions(ctx.query_gradients, parts.factors, parts.segments, variant)
    return source_scores(directions, parts.train_gradients)


def astra_source_scores(ctx: ModelAttribution, settings: MethodSettings):
    """ASTRA per segment with the harness's ASTRA settings (`solver_config`: absolute α = eval.solver.lr, momentum,
    decay, ℬ)."""
    parts = segment_parts(ctx, settings.source.num_segments)
    cfg = solver_config(settings, "astra")
    products = [a.product() for a in parts.averaged]
    samplers = [a.sampler(cfg.minibatch_size) for a in parts.averaged]
    results = astra_source_directions(ctx.query_gradients, parts.factors, parts.segments, products, samplers, cfg)
    return source_scores([r.x for r in results], parts.train_gradients)


def ekfac_source_lambda_scores(ctx: ModelAttribution, settings: MethodSettings):
    damping = if_damping(segment_parts(ctx, settings.source.num_segments).segments)
    return pair_scores(ekfac_inverse(ctx.factors, ctx.query_gradients, damping), ctx.train_gradients)


for _method in (
    Method("ekfac-source", "EK-FAC-SOURCE", ekfac_source_scores, uses_segments=True),
    Method("ekfac-source-damped", "EK-FAC-SOURCE (damped r̃)", lambda c, s: ekfac_source_scores(c, s, "damped"),
           uses_segments=True),
    Method("astra-source", "ASTRA-SOURCE", astra_source_scores, uses_segments=True),
    Method("ekfac-source-lambda", "EK-FAC-IF (SOURCE's λ)", ekfac_source_lambda_scores, uses_segments=True),
):
    register_method(_method)
