"""The pipeline's SOURCE stages: `dastra solve|score --method source|astra-source` (seeds §6-7, docs/design.md).

    solve   the trajectory (`source.trajectory`, or the tiny GPT-2's own) cut into `source.num_segments` segments;
            per segment ℓ the EK-FAC averaged over its checkpoints (`fit_segment_ekfac`, cached under
            source/segment_<ℓ>/), then the directions w_ℓ from the query gradients ∇f(θ^s): EK-FAC-SOURCE
            (`source.variant`) or ASTRA-SOURCE (the solver.* ASTRA settings, G̃ at the averaged weights θ̄_ℓ).
            ihvp/<name>/ holds directions_segment<ℓ>.safetensors, meta.json (segments, checkpoints) and, for
            astra-source, trace.parquet (query ids "<q>@segment<ℓ>").
    score   τ(z_q, z_m) = Σ_ℓ mean_{c ∈ ℓ} w_ℓᵀ ∇L(θ_c, z_m): one corpus pass per checkpoint with the model's weights
            set to θ_c, the per-sequence scores summed across passes, then the usual top-k.

SOURCE runs in one process (not on Ray workers); the final model's weights are restored after every pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from distributed_astra.artifacts import atomic_path, check_meta, load_tensors, read_meta, save_tensors, write_json
from distributed_astra.context import (
    Context,
    curvature_minibatches,
    directions_meta,
    factor_meta,
    load_query_gradients,
    solver_logger,
)
from distributed_astra.curvature.factors import EkfacFactors, load_factors, save_factors
from distributed_astra.data.sequences import QueryId
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.products import Vectors
from distributed_astra.ihvp.solvers import SolveResult
from distributed_astra.progress import console, progress_bar
from distributed_astra.scoring.gradients import captured_batches
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.source.averaging import average_states, fit_segment_ekfac
from distributed_astra.source.directions import astra_segment_direction, propagated_queries, source_directions
from distributed_astra.source.segments import Segment, if_damping, segment_trajectory
from distributed_astra.source.trajectory import TRAJECTORY_FILE, Trajectory, load_trajectory


@contextmanager
def weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """The model with its weights set to `state` inside the block, its own weights restored afterwards."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        yield model
    finally:
        model.load_state_dict(own)


def trajectory_folder(ctx: Context) -> Path:
    """`source.trajectory`, or the run's own trajectory/ for the tiny GPT-2; names the field when there is none."""
    cfg = ctx.cfg.source
    if cfg.trajectory is not None:
        folder = Path(cfg.trajectory)
        fix = "point it at a folder written by source.save_trajectory"
    elif ctx.cfg.model.source == "tiny":
        folder = ctx.paths.trajectory
        fix = f"delete '{ctx.paths.model}' to retrain the tiny GPT-2 with one, or set source.trajectory"
    else:
        raise DastraError(
            f"source.trajectory is null but model.source is '{ctx.cfg.model.source}': set source.trajectory to the "
            "folder of the model's training trajectory (source.TrajectoryRecorder + save_trajectory)"
        )
    if not (folder / TRAJECTORY_FILE).is_file():
        raise DastraError(f"source.trajectory: no trajectory at '{folder}' ({TRAJECTORY_FILE} missing); {fix}")
    return folder


def _segment_meta(ctx: Context, folder: Path, traj: Trajectory, seg: Segment) -> dict[str, object]:
    return {
        **factor_meta(ctx),
        "trajectory": str(folder.resolve()),
        "checkpoint_steps": [traj.checkpoints[i].step for i in seg.checkpoints],
    }


def _matches(folder: Path, expected: dict[str, object]) -> bool:
    if not (folder / "meta.json").is_file():
        return False
    try:
        check_meta(read_meta(folder, "segment factors", "solve"), expected, "segment factors", "solve")
    except DastraError:
        return False
    return True


def segment_factors(ctx: Context, folder: Path, traj: Trajectory, segments: list[Segment]) -> list[EkfacFactors]:
    """Ḡ_ℓ of every segment (seeds §6.3, App. D.2): read from source/segment_<ℓ>/ when fitted for the same model,
    corpus, factors settings and checkpoints, else fitted (two corpus passes per checkpoint) and saved."""
    cfg = ctx.cfg.factors
    out = []
    for seg in segments:
        path, meta = ctx.paths.source_factors(seg.index), _segment_meta(ctx, folder, traj, seg)
        if _matches(path, meta):
            out.append(load_factors(path, meta))
            continue

        def checkpoints(seg: Segment = seg):
            for i in seg.checkpoints:
                with weights(ctx.model, traj.state(i)) as model:
                    yield model, ctx.tracked

        console.print(f"fitting segment {seg.index}'s EK-FAC over {len(seg.checkpoints)} checkpoint(s)")
        factors = fit_segment_ekfac(
            checkpoints, lambda: ctx.training_batches(cfg.batch_size, cfg.max_sequences), ctx.stat_dtype, cfg.seed
        )
        save_factors(factors, path, {**meta, "dtype": cfg.dtype})
        out.append(factors)
    return out


def _astra_directions(
    ctx: Context, ids: list[QueryId], factors: list[EkfacFactors], segments: list[Segment], us: list[Vectors],
    traj: Trajectory,
) -> tuple[list[Vectors], list[SolveResult]]:
    """ASTRA-SOURCE (seeds §7): per segment, w_ℓ = (Ḡ_ℓ + λ_ℓI)⁻¹u_ℓ by ASTRA with G̃ at θ̄_ℓ (option 3), query chunks
    of `solver.query_batch_size`, the other solver.* settings as for `--solver astra`."""
    cfg = ctx.cfg.solver.model_copy(update={"name": "astra"})
    strategy = ctx.cfg.factors.strategy
    starts = range(0, len(ids), cfg.query_batch_size)
    directions: list[Vectors] = []
    results: list[SolveResult] = []
    with progress_bar("solve (astra-source)", len(segments) * len(starts) * cfg.iterations, "it") as advance:
        for seg, f, u in zip(segments, factors, us):
            with weights(ctx.model, average_states([traj.state(i) for i in seg.checkpoints])):
                product, sampler = curvature_minibatches(ctx)
                parts = []
                logger = solver_logger(ctx, f"astra-source/segment{seg.index}")
                for start in starts:
                    chunk = ids[start : start + cfg.query_batch_size]
                    log, _ = logger.chunk(chunk)
                    result = astra_segment_direction(
                        {name: g[start : start + len(chunk)] for name, g in u.items()}, f, seg, product, sampler,
                        cfg, strategy, [f"{q}@segment{seg.index}" for q in chunk],
                        lambda k, h, r, lr, log=log: (log(k, h, r, lr), advance(1)),
                    )
                    for message in result.messages:
                        console.print(f"[yellow]warning:[/] segment {seg.index}: {message}", highlight=False)
                    parts.append(result)
                    results.append(result)
                logger.finish(pa.concat_tables([r.table() for r in parts]))
            directions.append({name: torch.cat([r.x[name] for r in parts]) for name in u})
    return directions, results


def solve(ctx: Context) -> float:
    """SOURCE or ASTRA-SOURCE directions per segment (module docstring); returns the IF-comparable damping
    Σ_ℓ K_ℓλ_ℓ / Σ_ℓ K_ℓ (seeds §10.2)."""
    name, src = ctx.cfg.solver.name, ctx.cfg.source
    folder = trajectory_folder(ctx)
    traj = load_trajectory(folder)
    segments = segment_trajectory(traj, src.num_segments)
    ids, grads = load_query_gradients(ctx)  # ∇f(θ^s): u_{L−1}
    factors = segment_factors(ctx, folder, traj, segments)
    strategy = ctx.cfg.factors.strategy
    results: list[SolveResult] = []
    if name == "source":
        directions = source_directions(grads, factors, segments, src.variant, strategy)
    else:
        us = propagated_queries(grads, factors, segments, strategy)
        directions, results = _astra_directions(ctx, ids, factors, segments, us, traj)
    statuses = [s for r in results for s in r.status] or ["exact"] * (len(ids) * len(segments))
    damping = if_damping(segments)
    out = ctx.paths.ihvp(name)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for seg, w in zip(segments, directions):
            save_tensors({k: v.contiguous() for k, v in w.items()}, tmp / f"directions_segment{seg.index}.safetensors")
        if results:
            pq.write_table(pa.concat_tables([r.table() for r in results]), tmp / "trace.parquet")
        write_json(
            tmp / "meta.json",
            {
                **directions_meta(ctx),
                "solver": ctx.cfg.solver.model_dump(mode="json"),
                "source": src.model_dump(mode="json"),
                "damping": damping,  # IF-comparable; each segment's own λ_ℓ is in "segments"
                "status": {s: statuses.count(s) for s in sorted(set(statuses))},
                "query_ids": ids,
                "trajectory": str(folder.resolve()),
                "segments": [
                    {
                        "index": seg.index,
                        "steps": [seg.start, seg.end],
                        "mean_lr": seg.mean_lr,
                        "effective_lr": seg.effective_lr,
                        "horizon": seg.horizon,
                        "damping": seg.damping,
                        "checkpoints": [{"index": i, "step": traj.checkpoints[i].step} for i in seg.checkpoints],
                    }
                    for seg in segments
                ],
            },
        )
    ctx.tracker.log({f"solve/{name}/damping": damping, **{f"solve/{name}/segment{s.index}/damping": s.damping for s in segments}})
    return damping


@dataclass(frozen=True)
class ScoringPass:
    """One corpus pass of SOURCE scoring: the model at checkpoint `checkpoint` (trajectory index, taken after `step`
    optimizer steps), scored against w_ℓ / |C_ℓ| of its segment ℓ, so the passes' scores add up to τ."""

    checkpoint: int
    step: int
    segment: int
    directions: Vectors


def scoring_passes(ctx: Context, compute: torch.dtype) -> tuple[list[QueryId], Trajectory, list[ScoringPass]]:
    """(query ids, trajectory, passes) of `solver.name`'s SOURCE directions, checked against the model and the
    trajectory they were solved for."""
    solver_dir = ctx.paths.ihvp(ctx.cfg.solver.name)
    meta = read_meta(solver_dir, "solved directions", "solve")
    check_meta(meta, ctx.model_meta(), "solved directions", "solve")
    if "segments" not in meta:
        raise DastraError(f"{solver_dir} holds no SOURCE directions: re-run `dastra solve --method {ctx.cfg.solver.name}`")
    traj = load_trajectory(meta["trajectory"])
    passes = []
    for seg in meta["segments"]:
        tensors = load_tensors(
            solver_dir / f"directions_segment{seg['index']}.safetensors", "solved SOURCE directions",
            f"solve --method {ctx.cfg.solver.name}",
        )
        share = 1.0 / len(seg["checkpoints"])
        w = {name: (x * share).to(compute) for name, x in tensors.items()}
        for c in seg["checkpoints"]:
            if c["index"] >= len(traj.checkpoints) or traj.checkpoints[c["index"]].step != c["step"]:
                raise DastraError(
                    f"trajectory '{meta['trajectory']}' changed since the solve (no checkpoint at step {c['step']}): "
                    f"re-run `dastra solve --method {ctx.cfg.solver.name}`"
                )
            passes.append(ScoringPass(c["index"], c["step"], seg["index"], w))
    return meta["query_ids"], traj, passes


def summed_scores(
    ctx: Context, compute: torch.dtype, num_sequences: int
) -> tuple[torch.Tensor, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """(query ids, [(doc ids, scores [B, Q])] per corpus batch): τ summed over the passes (module docstring).

    The per-sequence scores of every batch are kept (float64, sequences × Q) until the last pass has added to them.
    """
    query_ids, traj, passes = scoring_passes(ctx, compute)
    doc_ids: list[torch.Tensor] = []
    totals: list[torch.Tensor] = []
    for number, p in enumerate(passes):
        label = f"score corpus (segment {p.segment}, checkpoint step {p.step}, pass {number + 1}/{len(passes)})"
        with weights(ctx.model, traj.state(p.checkpoint)), progress_bar(label, num_sequences, "seq") as advance:
            batches = captured_batches(ctx.model, ctx.tracked, ctx.training_batches(ctx.cfg.scoring.batch_size), compute)
            for j, (batch, capture) in enumerate(batches):
                scores = sequence_scores(capture.output_grads, capture.activations, p.directions).to(torch.float64)
                if number == 0:
                    doc_ids.append(batch["doc_id"])
                    totals.append(scores)
                else:
                    totals[j] += scores
                advance(len(batch["doc_id"]))
    return query_ids, zip(doc_ids, totals)
