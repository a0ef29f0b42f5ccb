"""The whole run configuration: one pydantic model per YAML section, loaded from a file plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["solver.damping=1e-3"])

An unknown key or a value of the wrong type raises `DastraError` naming the key path (`solver.damping: ...`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distributed_astra.errors import DastraError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """The demo's GPT-2, built and trained inside the run directory when `model.source` is `tiny`."""

    vocab_size: int = Field(4096, gt=0)
    n_layer: int = Field(2, gt=0)
    n_head: int = Field(4, gt=0)
    n_embd: int = Field(128, gt=0)
    train_steps: int = Field(1300, gt=0)
    train_batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class ModelConfig(Section):
    source: Literal["tiny", "path", "hub"] = "tiny"
    path: str | None = None
    hub_id: str | None = None
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    tracked_modules: list[str] = Field(default_factory=lambda: ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"])
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class DataConfig(Section):
    corpus: str = "demo"
    queries: str = "demo"
    text_column: str = "text"
    id_column: str = "doc_id"
    max_length: int = Field(64, gt=1)
    num_stdlib_docs: int = Field(1500, gt=0)
    num_facts: int = Field(40, gt=0)
    seed: int = 0


class FactorsConfig(Section):
    strategy: Literal["ekfac", "kfac"] = "ekfac"
    dtype: Literal["float32", "float64"] = "float64"
    batch_size: int = Field(32, gt=0)
    max_sequences: int | None = Field(None, gt=0)
    seed: int = 0


class SolverConfig(Section):
    """iHVP solver settings (seeds §4-5). Defaults are the ASTRA paper's GPT-2 column (seeds §10.2, Table 3)."""

    name: Literal["ekfac", "sni", "lissa", "astra"] = "ekfac"
    damping: float | Literal["auto"] = "auto"
    preconditioner_damping: float | None = Field(None, gt=0)  # λ̃ of ASTRA; None = λ (the paper's choice)
    product: Literal["ggn", "fisher"] = "ggn"  # exact minibatch GGN·v, or the hook-only sampled-label Fisher·v
    fisher_samples: int = Field(1, gt=0)  # label samples per token for the Fisher product
    iterations: int = Field(300, ge=0)
    lr: float = Field(1.0, gt=0)
    lr_mode: Literal["relative", "absolute"] = "relative"  # relative: α = lr × λ (Table 3); absolute: α = lr (Fig 3)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay: float = Field(0.9, gt=0, le=1)
    lr_decay_every: int = Field(100, gt=0)
    minibatch_size: int = Field(16, gt=0)  # ℬ, sequences per G̃ minibatch, sampled with replacement
    lissa_repeats: int = Field(1, gt=0)  # R of LiSSA (R = 1 is SNI)
    tolerance: float = Field(0.0, ge=0)  # stop a query when |Δh| / |h| stays below this for `patience` iterations
    patience: int = Field(10, gt=0)  # iterations of rising h (or of tiny |Δh|) before stopping a query
    query_batch_size: int = Field(16, gt=0)
    seed: int = 0


class ScoringConfig(Section):
    top_k: int = Field(10, gt=0)
    batch_size: int = Field(32, gt=0)
    dense: bool = False


class RayConfig(Section):
    address: str | None = None
    num_workers: int = Field(1, gt=0)


class DeepSpeedConfig(Section):
    stage: Literal[0, 1, 2, 3] = 0


class TrackingConfig(Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "distributed-astra"
    run_name: str | None = None


class OutputConfig(Section):
    run_dir: str = "runs/demo"


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    factors: FactorsConfig = Field(default_factory=FactorsConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named sections: artifacts record it and stages compare it."""
        dumped = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def _key_path(loc: tuple) -> str:
    """The part of a pydantic error location that names config keys: union-member tags are dropped."""
    keys: list[str] = []
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None:
            if isinstance(part, int):
                keys.append(str(part))
            continue
        keys.append(str(part))
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(keys)


def _first_error(exc: ValidationError, source: str) -> DastraError:
    err = exc.errors()[0]
    path = _key_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return DastraError(f"{source}: unknown key '{path}'; remove it or fix its spelling")
    return DastraError(f"{source}: {path}: {err['msg']} (got {err.get('input')!r})")


def _apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise DastraError(f"--set '{override}': expected KEY.PATH=VALUE, e.g. --set solver.damping=1e-3")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DastraError(f"--set {key}: '{part}' is not a section")
        node = child
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (the embedded `configs/tiny.yaml` when None), apply `a.b=c` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise DastraError(f"config file '{path}' not found; pass --config configs/tiny.yaml or another YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DastraError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise DastraError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise _first_error(exc, str(path)) from None
