"""The SOURCE stages: `dastra solve|score --method source|astra-source` (seeds §6-7, docs/design.md), on the
executor's ranks like every stage.

    solve   the trajectory (`source.trajectory`, or the tiny GPT-2's own) cut into `source.num_segments` segments;
            per segment ℓ the EK-FAC averaged over its checkpoints (stages/fit.py over the segment's checkpoints,
            cached under source/segment_<ℓ>/), then the directions w_ℓ from the query gradients ∇f(θ^s):
            EK-FAC-SOURCE (`source.variant`) or ASTRA-SOURCE (stages/solve.py with the solver.* ASTRA settings, G̃ at
            the averaged weights θ̄_ℓ). ihvp/<name>/ holds directions_segment<ℓ>.safetensors, meta.json (segments,
            checkpoints) and, for astra-source, trace.parquet (query ids "<q>@segment<ℓ>").
    score   stages/score.py: τ(z_q, z_m) = Σ_ℓ mean_{c ∈ ℓ} w_ℓᵀ ∇L(θ_c, z_m), one pass per checkpoint per shard.

Ranks set their model's weights to a checkpoint's (whole parameters: ZeRO stage 0) and restore their own after.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_astra.artifacts import atomic_path, check_meta, read_meta, save_tensors, write_json
from distributed_astra.context import Context, directions_meta, factor_meta, load_query_gradients
from distributed_astra.curvature.factors import EkfacFactors, load_factors
from distributed_astra.data.sequences import QueryId
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.products import Vectors
from distributed_astra.progress import console
from distributed_astra.source.directions import propagated_queries, source_directions
from distributed_astra.source.segments import Segment, if_damping, segment_trajectory
from distributed_astra.source.trajectory import TRAJECTORY_FILE, Trajectory, load_trajectory
from distributed_astra.stages.fit import fit_factors
from distributed_astra.stages.solve import solve_directions
from distributed_astra.tracking import metered


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
    out = []
    for seg in segments:
        path, meta = ctx.paths.source_factors(seg.index), _segment_meta(ctx, folder, traj, seg)
        if _matches(path, meta):
            out.append(load_factors(path, meta))
            continue
        console.print(f"fitting segment {seg.index}'s EK-FAC over {len(seg.checkpoints)} checkpoint(s)")
        fit_factors(
            ctx, f"fit segment {seg.index} (2 passes x {len(seg.checkpoints)} checkpoints)", path,
            {**meta, "dtype": ctx.cfg.factors.dtype}, str(folder.resolve()), seg.checkpoints,
        )
        out.append(load_factors(path, meta))
    return out


def _astra_directions(
    ctx: Context, ids: list[QueryId], factors: list[EkfacFactors], segments: list[Segment], us: list[Vectors],
    folder: Path,
) -> tuple[list[Vectors], list[str], list[pa.Table]]:
    """ASTRA-SOURCE (seeds §7): per segment, w_ℓ = (Ḡ_ℓ + λ_ℓI)⁻¹u_ℓ by ASTRA preconditioned by the segment's EK-FAC
    with λ̃_ℓ = λ_ℓ and started at its solution, G̃ at θ̄_ℓ (option 3); the other solver.* settings as for astra."""
    astra = replace(ctx, cfg=ctx.cfg.model_copy(update={"solver": ctx.cfg.solver.model_copy(update={"name": "astra"})}))
    directions, statuses, traces = [], [], []
    for seg, f, u in zip(segments, factors, us):
        x, status, trace, _, _ = solve_directions(
            astra, f, u, seg.damping, [f"{q}@segment{seg.index}" for q in ids], f"astra-source/segment{seg.index}",
            str(folder.resolve()), seg.checkpoints,
        )
        directions.append(x)
        statuses.extend(status)
        traces.append(trace)
    return directions, statuses, traces


@metered(lambda ctx: f"solve/{ctx.cfg.solver.name}")
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
    traces: list[pa.Table] = []
    if name == "source":
        directions = source_directions(grads, factors, segments, src.variant, strategy)
        statuses = ["exact"] * (len(ids) * len(segments))
    else:
        us = propagated_queries(grads, factors, segments, strategy)
        directions, statuses, traces = _astra_directions(ctx, ids, factors, segments, us, folder)
    damping = if_damping(segments)
    out = ctx.paths.ihvp(name)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for seg, w in zip(segments, directions):
            save_tensors({k: v.contiguous() for k, v in w.items()}, tmp / f"directions_segment{seg.index}.safetensors")
        if traces:
            pq.write_table(pa.concat_tables(traces), tmp / "trace.parquet")
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
    ctx.tracker.log({f"solve/{name}/damping": damping,
                     **{f"solve/{name}/segment{s.index}/damping": s.damping for s in segments}})
    return damping
