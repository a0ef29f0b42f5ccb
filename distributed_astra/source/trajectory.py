"""A training trajectory for SOURCE (seeds §6): checkpoints, the applied learning rate of every step, the optimizer.

    rec = TrajectoryRecorder(OptimizerSettings("sgd", momentum=0.9), batch_size=64, num_train=6144)
    rec.checkpoint(model, optimizer)                    # θ_0 (optional)
    for each step:  optimizer.step(); rec.step(lr_used, model, optimizer, save=step_is_a_checkpoint)
    save_trajectory(rec.trajectory, "runs/x/trajectory")   # atomic folder: trajectory.json + checkpoints/*.safetensors
    traj = load_trajectory("runs/x/trajectory"); traj.state(i)  # the i-th checkpoint's state dict

Conventions:
- `learning_rates[k]` is η_k, the rate applied by optimizer step k (k = 0 … T−1, T = number of steps), after any
  schedule and warm-up. A checkpoint's `step` is the number of optimizer steps taken before it was saved: step 0 is
  the initialisation θ_0, step T the final parameters θ^s.
- Optimizers (`OptimizerSettings.name`): "sgd" (PyTorch SGD, heavy-ball momentum μ, coupled weight decay: the
  gradient gets + wd·θ), "adam" (Adam with coupled L2 weight decay) and "adamw" (decoupled decay θ ← θ − η·wd·θ).
  For Adam/AdamW every checkpoint records `preconditioner_rms`, the mean over the model's trainable parameters of
  √v̂ + ε (v̂ the bias-corrected second moment), which `segments.py` uses for the scalar Adam mapping.
- Training without replacement (epochs) and with replacement (Eq 13) are both fine: SOURCE only needs T, η_k, the
  batch size and N.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_astra.artifacts import atomic_path, load_tensors, save_tensors, write_json
from distributed_astra.errors import DastraError

TRAJECTORY_FILE = "trajectory.json"
CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer's settings that SOURCE needs: its kind, momentum μ (β₁ for Adam) and weight decay."""

    name: str
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise DastraError(f"trajectory optimizer '{self.name}' is not one of: {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise DastraError(f"trajectory optimizer momentum must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0.0:
            raise DastraError(f"trajectory optimizer weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def is_adam(self) -> bool:
        return self.name in ("adam", "adamw")


@dataclass
class CheckpointRecord:
    """One saved state: taken after `step` optimizer steps; `file` is relative to the trajectory folder."""

    step: int
    file: str
    preconditioner_rms: float | None = None


@dataclass
class Trajectory:
    """Checkpoints (ascending steps), the applied learning rate of every step, and the optimizer.

    `states` holds the checkpoints' state dicts while recording; a loaded trajectory reads them from `root` on demand
    (`state(i)`). `info` is free JSON metadata of the recipe (task, seed, ...).
    """

    optimizer: OptimizerSettings
    batch_size: int
    num_train: int
    learning_rates: list[float] = field(default_factory=list)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    states: list[dict[str, torch.Tensor]] | None = None

    @property
    def num_steps(self) -> int:
        """T, the number of optimizer steps."""
        return len(self.learning_rates)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def state(self, index: int) -> dict[str, torch.Tensor]:
        """The state dict of checkpoint `index` (from memory while recording, else from the folder)."""
        if not -len(self.checkpoints) <= index < len(self.checkpoints):
            raise DastraError(f"trajectory has {len(self.checkpoints)} checkpoints, no checkpoint {index}")
        if self.states is not None:
            return self.states[index]
        if self.root is None:
            raise DastraError("trajectory has neither states in memory nor a folder: load it with load_trajectory")
        path = self.root / self.checkpoints[index].file
        if not path.is_file():
            raise DastraError(f"trajectory checkpoint '{path}' is missing: re-run the training recipe")
        return load_tensors(path, "trajectory checkpoint", "", fix="re-run the training recipe")

    def validate(self) -> None:
        """Raise `DastraError` naming the field when the trajectory is inconsistent."""
        if self.batch_size < 1 or self.num_train < 1:
            raise DastraError(
                f"trajectory batch_size ({self.batch_size}) and num_train ({self.num_train}) must be >= 1"
            )
        if self.num_steps == 0:
            raise DastraError("trajectory has no recorded step (learning_rates is empty)")
        if not all(math.isfinite(lr) and lr >= 0 for lr in self.learning_rates):
            raise DastraError("trajectory learning_rates must be finite and >= 0")
        if not self.checkpoints:
            raise DastraError("trajectory has no checkpoint: save at least one during training")
        steps = self.steps
        if steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] > self.num_steps:
            raise DastraError(
                f"trajectory checkpoint steps {steps} must be distinct, ascending and within [0, {self.num_steps}]"
            )
        if self.optimizer.is_adam and any(c.preconditioner_rms is None for c in self.checkpoints):
            raise DastraError(
                f"trajectory optimizer '{self.optimizer.name}' needs preconditioner_rms at every checkpoint "
                "(record the checkpoints with TrajectoryRecorder, passing the optimizer)"
            )
        if self.states is not None and len(self.states) != len(self.checkpoints):
            raise DastraError("trajectory states and checkpoints differ in number")


def adam_preconditioner_rms(optimizer: torch.optim.Optimizer) -> float:
    """Mean over the optimizer's parameters (every entry) of √v̂ + ε, v̂ = exp_avg_sq / (1 − β₂^t).

    Parameters the optimizer has not stepped yet (no state) count with v̂ = 0, i.e. ε.
    """
    total, count = 0.0, 0
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state:
                t = float(state["step"])
                v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**t)
                total += float((v_hat.sqrt() + eps).sum())
            else:
                total += eps * p.numel()
            count += p.numel()
    if count == 0:
        raise DastraError("the optimizer has no parameters: cannot record Adam's preconditioner")
    return total / count


class TrajectoryRecorder:
    """Records a `Trajectory` during training: call `step` after every optimizer step (and `checkpoint` for θ_0)."""

    def __init__(
        self, optimizer: OptimizerSettings, batch_size: int, num_train: int, info: Mapping[str, Any] | None = None
    ) -> None:
        self.trajectory = Trajectory(optimizer, int(batch_size), int(num_train), info=dict(info or {}), states=[])

    def checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Save the model's current state as a checkpoint taken after the steps recorded so far."""
        traj = self.trajectory
        step = traj.num_steps
        if traj.checkpoints and traj.checkpoints[-1].step == step:
            return
        rms = None
        if traj.optimizer.is_adam:
            if optimizer is None:
                raise DastraError("an Adam trajectory needs the optimizer at every checkpoint (its second moments)")
            rms = adam_preconditioner_rms(optimizer)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        traj.checkpoints.append(CheckpointRecord(step, f"{CHECKPOINT_DIR}/step_{step:08d}.safetensors", rms))
        traj.states.append(state)

    def step(
        self, lr: float, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
        save: bool = False,
    ) -> None:
        """Record one optimizer step taken with learning rate `lr`; with save=True, checkpoint the state after it."""
        self.trajectory.learning_rates.append(float(lr))
        if save:
            if model is None:
                raise DastraError("TrajectoryRecorder.step(save=True) needs the model")
            self.checkpoint(model, optimizer)


def save_trajectory(traj: Trajectory, folder: str | os.PathLike) -> Path:
    """Write `trajectory.json` and one safetensors file per checkpoint into `folder`, atomically."""
    traj.validate()
    folder = Path(folder)
    description = {
        "format": FORMAT_VERSION,
        "optimizer": asdict(traj.optimizer),
        "batch_size": traj.batch_size,
        "num_train": traj.num_train,
        "learning_rates": traj.learning_rates,
        "checkpoints": [asdict(c) for c in traj.checkpoints],
        "info": traj.info,
    }
    with atomic_path(folder) as tmp:
        (tmp / CHECKPOINT_DIR).mkdir(parents=True)
        for i, record in enumerate(traj.checkpoints):
            save_tensors(traj.state(i), tmp / record.file)
        write_json(tmp / TRAJECTORY_FILE, description)
    return folder


def load_trajectory(folder: str | os.PathLike) -> Trajectory:
    """Read a trajectory folder (checkpoints stay on disk until `state(i)`); `DastraError` names what is wrong."""
    folder = Path(folder)
    path = folder / TRAJECTORY_FILE
    if not path.is_file():
        raise DastraError(f"no trajectory at '{folder}' ({TRAJECTORY_FILE} missing): run a recipe that records one")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT_VERSION:
            raise DastraError(f"trajectory at '{folder}' has format {raw.get('format')}, expected {FORMAT_VERSION}")
        traj = Trajectory(
            OptimizerSettings(**raw["optimizer"]),
            int(raw["batch_size"]),
            int(raw["num_train"]),
            [float(x) for x in raw["learning_rates"]],
            [CheckpointRecord(**c) for c in raw["checkpoints"]],
            dict(raw.get("info", {})),
            root=folder,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DastraError(
            f"trajectory at '{folder}' is corrupt ({type(exc).__name__}: {exc}): record it again"
        ) from None
    traj.validate()
    for record in traj.checkpoints:
        if not (folder / record.file).is_file():
            raise DastraError(f"trajectory checkpoint '{folder / record.file}' is missing: record the trajectory again")
    return traj


@contextmanager
def weights(model: nn.Module, state: Mapping[str, torch.Tensor] | None) -> Iterator[nn.Module]:
    """The model with its weights set to `state` inside the block (a checkpoint's, or None: its own), its own
    weights restored afterwards."""
    if state is None:
        yield model
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        yield model
    finally:
        model.load_state_dict(own)
