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
SOURCE_SOLVERS = ("source", "astra-source")  # solver names that attribute over the training trajectory (seeds §6-7)


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
    id_column: str | None = "doc_id"  # None: the document id is the row number (data/corpus.py)
    split: str = "train"  # the split read from a DatasetDict `save_to_disk` folder
    max_length: int = Field(64, gt=1)
    num_stdlib_docs: int = Field(1500, gt=0)
    num_facts: int = Field(40, gt=0)
    seed: int = 0
    shard_rows: int = Field(256, gt=0)  # corpus rows per shard (stable shard ids: distributed scoring, its resume)


class FactorsConfig(Section):
    strategy: Literal["ekfac", "kfac"] = "ekfac"
    dtype: Literal["float32", "float64"] = "float64"
    batch_size: int = Field(32, gt=0)
    max_sequences: int | None = Field(None, gt=0)
    seed: int = 0


class SolverConfig(Section):
    """iHVP solver settings (seeds §4-5). Defaults are the ASTRA paper's GPT-2 column (seeds §10.2, Table 3)."""

    # source | astra-source: SOURCE over the training trajectory (`source` section, seeds §6-7), single-process
    name: Literal["ekfac", "sni", "lissa", "astra", "source", "astra-source"] = "ekfac"
    # solved and scored too by `dastra run`, for comparison (summary.json, report); top-k under baselines/<name>/
    baselines: list[Literal["ekfac", "sni", "lissa", "astra", "source", "astra-source"]] = Field(default_factory=list)
    damping: float | Literal["auto"] = "auto"
    preconditioner_damping: float | None = Field(None, gt=0)  # λ̃ of ASTRA; None = λ (the paper's choice)
    product: Literal["ggn", "fisher"] = "ggn"  # exact minibatch GGN·v, or the hook-only sampled-label Fisher·v
    fisher_samples: int = Field(1, gt=0)  # label samples per token for the Fisher product
    iterations: int = Field(300, ge=0)
    lr: float = Field(1.0, gt=0)
    lr_mode: Literal["auto", "relative", "absolute"] = "auto"  # auto: α = lr / μ̂_max; relative: α = lr × λ (Table 3); absolute: α = lr (Fig 3)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay: float = Field(0.9, gt=0, le=1)
    lr_decay_every: int = Field(100, gt=0)
    minibatch_size: int = Field(16, gt=0)  # ℬ, sequences per G̃ minibatch, sampled with replacement
    lissa_repeats: int = Field(1, gt=0)  # R of LiSSA (R = 1 is SNI)
    tolerance: float = Field(0.0, ge=0)  # stop a query when |Δh| / |h| stays below this for `patience` iterations
    patience: int = Field(10, gt=0)  # iterations of rising h (or of tiny |Δh|) before stopping a query
    query_batch_size: int = Field(16, gt=0)
    heldout_every: int = Field(
        10,
        ge=0,
        description="iterations between evaluations of h and the residual on ONE fixed held-out curvature batch "
        "(also at the start and the end; 0: off): the convergence signal of the report and W&B. Costs "
        "(iterations / heldout_every + 2) x heldout_batch_size sequence-products per chunk against the solve's "
        "iterations x minibatch_size (the demo: 3 x 4 / (20 x 8) = 7.5%)",
    )
    heldout_batch_size: int = Field(
        4, gt=0, description="sequences of the fixed held-out curvature batch (drawn once, with its own generator)"
    )
    seed: int = 0


class SourceConfig(Section):
    """SOURCE and ASTRA-SOURCE (`solver.name: source | astra-source`; seeds §6-7, docs/design.md "SOURCE").

    The trajectory is recorded while the demo's tiny GPT-2 trains (`model.source: tiny`, into `<run_dir>/trajectory`);
    for `model.source: path | hub` it is a folder written by `source.save_trajectory`, named by `trajectory`.
    """

    num_segments: int = Field(3, gt=0)  # L: equal ranges of optimizer steps (the papers' 3)
    variant: Literal["exp", "damped"] = "exp"  # r̄ of `source`: exp form (EK-FAC-SOURCE) or damped (Ḡ + λ_ℓI)⁻¹
    checkpoints: int = Field(6, gt=0)  # checkpoints recorded while the tiny GPT-2 trains, evenly spaced, the last = θ^s
    trajectory: str | None = None  # trajectory folder for model.source path | hub; null with tiny = <run_dir>/trajectory


class ScoringConfig(Section):
    top_k: int = Field(10, gt=0)
    batch_size: int = Field(32, gt=0)
    dense: bool = False


class ReportConfig(Section):
    """`report.html` (`dastra report`): how much of the run a person is shown."""

    num_queries: int = Field(20, gt=0)  # the first queries of topk.parquet that get a section (per-token pass)
    max_tokens: int = Field(64, gt=0)  # tokens of document text shown: the window holding the most influence


class ProjectionConfig(Section):
    """Kronecker-factored random projection of per-module gradients (scoring/projection.py)."""

    seed: int = 0
    out_dim: int = Field(16, gt=0)  # k_out: rows of P_out, per module
    in_dim: int = Field(16, gt=0)  # k_in: rows of P_in, per module
    per_module: dict[str, tuple[int, int]] = Field(default_factory=dict)  # glob -> (k_out, k_in), first match wins


class IndexConfig(Section):
    """The projected gradient store and its faiss index (index/), and `dastra search`."""

    store_dtype: Literal["float16", "float32"] = "float16"
    # auto: flat below ivf_min_documents, ivfflat from there; ivfpq (IVF-PQ + exact refine) only when asked for
    kind: Literal["auto", "flat", "ivfflat", "ivfpq"] = "auto"
    ivf_min_documents: int = Field(100_000, gt=0)
    nlist: int | None = Field(None, gt=0)  # IVF lists; None: 4 sqrt(N)
    pq_m: int | None = Field(None, gt=0)  # PQ sub-quantizers (must divide the total dimension); None: D / 8
    pq_bits: int = Field(8, gt=0, le=16)
    norm_bands: int = Field(8, gt=0)  # IVF lists = norm bands x spherical k-means of directions (faiss_index.py)
    nprobe: int | None = Field(None, gt=0)  # lists probed; None: max(min_nprobe, ceil(probe_fraction x nlist))
    # one default for ivfflat and ivfpq: the top-10 lie in the few lists of highest bound, a count that grows slowly
    # with N, so a small fraction of many lists (0.05 of 1,264 at 100k: recall 0.95) or a floor of lists on small
    # stores (48 of 96 on the demo store: 0.97); docs/results/retrieval.md
    probe_fraction: float = Field(0.05, gt=0, le=1)
    min_nprobe: int = Field(48, gt=0)
    refine_factor: int = Field(50, gt=0)  # IndexRefine k_factor: PQ candidates re-ranked exactly per result
    train_size: int = Field(65_536, gt=0)  # vectors sampled (evenly) to train the IVF lists and PQ codebooks
    train_iterations: int = Field(10, gt=0)  # k-means iterations (IVF directions, PQ codebooks)
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: GPU when faiss has one; gpu without one warns, uses CPU
    shortlist_factor: int = Field(10, gt=0)  # r: the index returns top_k x r candidates per query
    rescore: bool = True  # re-score the candidates exactly with full gradients before keeping the top-k


class RayConfig(Section):
    """Distributed execution (docs/distributed.md): num_workers > 1, an address or deepspeed.stage > 0 turn it on."""

    address: str | None = None  # a running cluster ("host:6379"); null = an embedded local Ray on 127.0.0.1
    num_workers: int = Field(1, gt=0)  # ranks of the DeepSpeed group (fit, solve) and scoring actors
    use_gpu: bool = False  # one GPU per worker (NCCL); false = CPU workers (gloo)
    cpus_per_worker: int = Field(1, gt=0)  # CPUs per worker bundle, also its torch/BLAS threads
    num_cpus: int | None = Field(None, gt=0)  # CPUs of an embedded Ray (null: every core of this machine)
    object_store_mb: int = Field(256, gt=0)  # object store of an embedded Ray
    connect_timeout_s: float = Field(30.0, gt=0)  # an unreachable ray.address fails after this
    timeout_s: float = Field(1800.0, gt=0)  # longest wait for one distributed step (a collective, a shard)
    max_restarts: int = Field(2, ge=0)  # restarts of a dead scoring actor; its shard is retried as often
    solve_mode: Literal["auto", "queries", "data"] = "auto"  # auto: queries on replicated models, data under ZeRO-3


class DeepSpeedConfig(Section):
    stage: Literal[0, 1, 2, 3] = 0
    config: str | None = None  # a DeepSpeed JSON; null = configs/ds/zero{stage}.json


class TrackingConfig(Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "distributed-astra"
    run_name: str | None = None


class PlanConfig(Section):
    """The memory/time planner (`dastra plan`, docs/gpt2xl.md); `dastra run` refuses a config it says cannot fit."""

    gpus: int | None = Field(None, gt=0)  # GPUs (ranks) in all; null = ray.num_workers
    gpus_per_node: int = Field(8, gt=0)
    gpu_memory: str | None = None  # per GPU, e.g. "80GB"; null = this machine's GPU, else its RAM
    memory_reserve: float = Field(0.1, ge=0, lt=1)  # fraction kept free (CUDA context, allocator fragmentation)
    throughput_tflops: float = Field(200.0, gt=0)  # sustained matmul TFLOP/s per GPU used for the time column
    documents: int | None = Field(None, gt=0)  # corpus size when data.corpus cannot be read (null: its row count)
    tokens_per_document: int | None = Field(None, gt=0)  # null = data.max_length (one full sequence per document)
    hf_config: str | None = None  # a config.json to plan from without weights (e.g. configs/models/gpt2-xl.json)
    check: bool = True  # `dastra run` refuses a config whose stages do not fit, before any work


class OutputConfig(Section):
    run_dir: str = "runs/demo"


class EvalConfig(Section):
    """The LDS harness and fact tracing (`dastra eval lds|facts`; seeds §9.1, docs/results/lds.md)."""

    num_subsets: int = Field(100, gt=1)  # M: random subsets S_j kept for retraining
    subset_fraction: float = Field(0.5, gt=0, lt=1)  # β: |S_j| = ⌊βN⌋
    num_retrain_seeds: int = Field(5, gt=0)  # R: retraining seeds per subset, averaged
    ensemble_size: int = Field(5, gt=0)  # E: models trained on all data, each with its own factors and iHVPs
    damping_scale: float = Field(10.0, gt=0)  # λ = damping_scale × mean(Λ) of each model (the digits sweep, lds.md)
    damping_sweep: list[float] = Field(default_factory=list)  # extra damping_scale values for the λ sweep
    iterations: int = Field(200, ge=0)  # SNI and ASTRA iterations (seeds Table 3)
    minibatch_size: int = Field(64, gt=0)  # ℬ of the G̃ minibatches
    astra_lr: float = Field(0.01, gt=0)  # ASTRA's absolute step α (docs/results/convergence.md: best on the MLP)
    sni_lr: float = Field(1.0, gt=0)  # SNI's step as a multiple of 1/(max Λ + λ)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_decay: float = Field(0.5, gt=0, le=1)  # ×0.5 every 50 iterations (seeds Table 3)
    lr_decay_every: int = Field(50, gt=0)
    trak_dim: int = Field(256, gt=0)  # TRAK projection dimension k (capped at N/2)
    cache_dir: str = "runs/eval"  # retrained models, measurements and scores, keyed by task/recipe/subset/seed
    results_dir: str = "docs/results"  # lds.md, lds.png and lds.json (per-task results, merged across runs)
    seed: int = 0  # subsets
    recipe: dict[str, int | float | list[int]] = Field(default_factory=dict)  # overrides of the task's recipe fields
    facts_methods: list[str] = Field(default_factory=lambda: ["graddot", "ekfac", "astra"])


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    factors: FactorsConfig = Field(default_factory=FactorsConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

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
