"""SOURCE segments of a trajectory: steps, checkpoints, mean and effective learning rates, damping (seeds §6.2-6.3).

Segment ℓ (1-based in the papers, 0-based here) covers steps [T_{ℓ−1}, T_ℓ), T_ℓ = round(ℓ·T/L) ("equally
partitioned at the early, middle and late stages", §6.3), K_ℓ = T_ℓ − T_{ℓ−1}. It owns the checkpoints whose step s
satisfies T_{ℓ−1} < s ≤ T_ℓ (the initial state, s = 0, goes to the first segment); its Ḡ_ℓ and ḡ_ℓ are averages
over them.

Effective learning rate η_eff (the rate that multiplies the curvature in the step Jacobian I − η_eff·(G + shift·I)):
- SGD with heavy-ball momentum μ: η̄_ℓ / (1 − μ), the terminal velocity (§6.3). This is what reproduces the ASTRA
  paper's dampings, e.g. MNIST: η = 0.03, μ = 0.9, T = 1920, L = 3 → 1/(0.3·640) = 0.0052 (§10.2).
- Adam / AdamW (§13.6; SOURCE App. C): the update is η·P·m with P = diag(1/(√v̂ + ε)) and m an average of gradients
  (no 1/(1−β₁) factor: Adam's momentum is normalised). SOURCE's damping is the diagonal (η̄K)⁻¹P̄⁻¹; we map it to
  one scalar by averaging that diagonal over the parameters and checkpoints: λ_ℓ = mean(√v̂ + ε)/(η̄_ℓK_ℓ), i.e.
  η_eff = η̄_ℓ / mean(√v̂ + ε). (SOURCE itself uses a diagonal Hessian for the exponentials under Adam; the scalar
  mapping keeps the EK-FAC eigenbasis and ASTRA unchanged.)

Weight decay enters the step Jacobian as a curvature shift: I − η(H + wd·I) for SGD and Adam with coupled decay
(`shift` = wd), I − η·wd − η·P·H ≈ I − η_eff(H + wd·rms·I) for AdamW (`shift` = wd·mean(√v̂ + ε)). The segment
then uses Ḡ + shift·I wherever SOURCE uses Ḡ, so the damped iHVP's λ_ℓ = 1/(η_eff K_ℓ) + shift.
"""

from __future__ import annotations

from dataclasses import dataclass

from distributed_astra.errors import DastraError
from distributed_astra.source.trajectory import Trajectory


@dataclass(frozen=True)
class Segment:
    """One SOURCE segment: steps [start, end), its checkpoints (indices into the trajectory) and rates."""

    index: int
    start: int
    end: int
    checkpoints: tuple[int, ...]
    mean_lr: float  # η̄_ℓ, the mean applied learning rate over the segment's steps
    effective_lr: float  # η̄_ℓ / (1 − μ) for SGD, η̄_ℓ / mean(√v̂ + ε) for Adam
    shift: float = 0.0  # weight decay's contribution to the curvature (module docstring)

    @property
    def num_steps(self) -> int:
        """K_ℓ."""
        return self.end - self.start

    @property
    def horizon(self) -> float:
        """c_ℓ = η_eff·K_ℓ: S̄_ℓ = exp(−c_ℓ(Ḡ_ℓ + shift)), r̄_ℓ = (I − S̄_ℓ)(Ḡ_ℓ + shift)⁻¹ḡ_ℓ (seeds Eq 16)."""
        return self.effective_lr * self.num_steps

    @property
    def implicit_damping(self) -> float:
        """1/(η_eff K_ℓ): the damping that truncated unrolling implies (seeds §6.2, §10.2)."""
        if not self.horizon > 0:
            raise DastraError(f"segment {self.index} has learning rate 0 over its steps: its damping is infinite")
        return 1.0 / self.horizon

    @property
    def damping(self) -> float:
        """λ_ℓ of the damped form (Ḡ_ℓ + λ_ℓI)⁻¹ḡ_ℓ: the implicit damping plus the weight-decay shift."""
        return self.implicit_damping + self.shift


def segment_trajectory(traj: Trajectory, num_segments: int = 3) -> list[Segment]:
    """Split `traj` into `num_segments` equal segments of steps (module docstring); each must own a checkpoint."""
    traj.validate()
    total = traj.num_steps
    if not 1 <= num_segments <= total:
        raise DastraError(
            f"number of SOURCE segments must lie in [1, {total}] (the trajectory's steps), got {num_segments}"
        )
    bounds = [round(i * total / num_segments) for i in range(num_segments + 1)]
    opt = traj.optimizer
    segments = []
    for index in range(num_segments):
        start, end = bounds[index], bounds[index + 1]
        owned = tuple(
            i for i, c in enumerate(traj.checkpoints) if start < c.step <= end or (index == 0 and c.step == 0)
        )
        if not owned:
            raise DastraError(
                f"SOURCE segment {index} (steps {start}..{end}) has no checkpoint (checkpoint steps {traj.steps}): "
                "save checkpoints in every segment or use fewer segments"
            )
        mean_lr = sum(traj.learning_rates[start:end]) / (end - start)
        if opt.is_adam:
            rms = sum(traj.checkpoints[i].preconditioner_rms for i in owned) / len(owned)
            effective = mean_lr / rms
            shift = opt.weight_decay * (rms if opt.name == "adamw" else 1.0)
        else:
            effective = mean_lr / (1.0 - opt.momentum)
            shift = opt.weight_decay
        segments.append(Segment(index, start, end, owned, mean_lr, effective, shift))
    return segments


def if_damping(segments: list[Segment]) -> float:
    """The damping that makes IF comparable with SOURCE: Σ_ℓ K_ℓλ_ℓ / Σ_ℓ K_ℓ (seeds §10.2)."""
    steps = sum(s.num_steps for s in segments)
    return sum(s.num_steps * s.damping for s in segments) / steps
