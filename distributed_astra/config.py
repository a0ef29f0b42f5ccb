"""The whole run configuration: one pydantic model per YAML section, loaded from a file plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["solver.damping=1e-3"])

An unknown key or a value of the wrong type raises `DastraError` naming the key path (`solver.damping: ...`).

The shipped configs are package data in `distributed_astra/configs/` (tiny.yaml, gpt2xl.yaml, ds/zero*.json,
models/*.json), so a wheel install has them too. A relative path that does not exist from the working directory is
looked up in that folder, with or without its `configs/` prefix: `--config configs/gpt2xl.yaml` (what the README and
docs write) and `--config gpt2xl.yaml` both find `distributed_astra/configs/gpt2xl.yaml` from any directory. A file
that does exist where the path points always wins.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from distributed_astra.errors import DastraError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data: tiny.yaml, gpt2xl.yaml, ds/, models/
DEFAULT_CONFIG = CONFIGS_DIR / "tiny.yaml"
SOURCE_SOLVERS = ("source", "astra-source")  # solver names that attribute over the training trajectory (seeds §6-7)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """The demo's GPT-2, built and trained inside the run directory when `model.source` is `tiny`."""

    vocab_size: int = Field(4096, gt=0, description="byte-level BPE vocabulary trained on the corpus")
    n_layer: int = Field(2, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads per block")
    n_embd: int = Field(128, gt=0, description="hidden width")
    train_steps: int = Field(1300, gt=0, description="AdamW steps of the demo training")
    train_batch_size: int = Field(32, gt=0, description="sequences per training step")
    learning_rate: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    seed: int = Field(0, description="initialisation and batch-order seed")


class ModelConfig(Section):
    """The model attributed: the demo's tiny GPT-2, a local Hugging Face folder or a hub id."""

    source: Literal["tiny", "path", "hub"] = Field(
        "tiny", description="tiny (built and trained in the run dir) | path (model.path) | hub (model.hub_id)"
    )
    path: str | None = Field(None, description="a local HF model folder (model.source: path)")
    hub_id: str | None = Field(None, description="a hub id found in the local HF cache (model.source: hub)")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32", description="the model's compute dtype; statistics always use factors.dtype"
    )
    tracked_modules: list[str] = Field(
        default_factory=lambda: ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"],
        description="glob patterns over module names whose weights are attributed; nn.Linear and HF Conv1D only",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the demo's GPT-2")


class DataConfig(Section):
    """The training corpus, the queries, and how documents become token sequences (docs/design.md, "Documents")."""

    corpus: str = Field(
        "demo", description="demo | a Parquet/Arrow file, a glob, a folder of such files, or a save_to_disk folder"
    )
    queries: str = Field(
        "demo", description="demo | a Parquet file with query_id, prompt, completion (and optionally fact_doc_id)"
    )
    text_column: str = Field("text", description="the corpus column holding each document's text")
    id_column: str | None = Field(
        "doc_id", description="an integer or string document id column, or null to use row numbers as ids"
    )
    split: str = Field("train", description="the split read from a DatasetDict save_to_disk folder")
    max_length: int = Field(64, gt=1, description="tokens per sequence (at most the model's positions)")
    long_documents: Literal["split", "truncate"] = Field(
        "split",
        description="split: a long document becomes several sequences (every token counts) | truncate: only its "
        "first max_length tokens (kronfluence's and bergson's examples)",
    )
    add_eos: bool = Field(True, description="end every document with the tokenizer's eos token before cutting")
    num_stdlib_docs: int = Field(1500, gt=0, description="demo corpus: standard-library documents")
    num_facts: int = Field(40, gt=0, description="demo corpus: planted made-up facts (two queries each)")
    seed: int = Field(0, description="demo corpus: placement of the fact documents")
    shard_rows: int = Field(
        256, gt=0, description="corpus rows per shard: the unit of distributed scoring, of the store and of resume"
    )


class FactorsConfig(Section):
    """The EK-FAC fit (`dastra fit`, seeds §3)."""

    strategy: Literal["ekfac", "kfac"] = Field(
        "ekfac", description="ekfac (corrected eigenvalues Λ) | kfac (Kronecker products of the A and S spectra)"
    )
    dtype: Literal["float32", "float64"] = Field(
        "float64", description="statistics and eigendecompositions, whatever the model dtype"
    )
    batch_size: int = Field(32, gt=0, description="sequences per fit batch")
    max_sequences: int | None = Field(None, gt=0, description="cap on sequences per pass (null: the whole corpus)")
    seed: int = Field(0, description="label sampling for the true Fisher")


METHODS = Literal["ekfac", "sni", "lissa", "astra", "source", "astra-source"]


class SolverConfig(Section):
    """iHVP solver settings (seeds §4-5). Defaults are the ASTRA paper's GPT-2 column (seeds §10.2, Table 3)."""

    name: METHODS = Field(
        "astra",
        description="ekfac | sni | lissa | astra (seeds §4-5) | source | astra-source (§6-7, over the training "
        "trajectory); its top-k is topk.parquet and the report's",
    )
    baselines: list[METHODS] = Field(
        default_factory=lambda: ["ekfac"],
        description="also solved and scored by `dastra run`, for comparison (summary.json, report); top-k under "
        "baselines/<name>/",
    )
    damping: float | Literal["auto"] = Field(
        "auto", description="λ: auto = 0.1 x mean(Λ) (docs/design.md, \"Damping\"), or a number"
    )
    preconditioner_damping: float | None = Field(
        None, gt=0, description="λ̃ of ASTRA's EK-FAC preconditioner; null = λ (the paper's choice)"
    )
    product: Literal["ggn", "fisher"] = Field(
        "ggn", description="ggn: exact minibatch GGN·v | fisher: the hook-only sampled-label Fisher·v"
    )
    fisher_samples: int = Field(1, gt=0, description="label samples per token for the Fisher product")
    micro_batch_size: int | None = Field(
        None, gt=0, description="sequences per curvature-product pass: a minibatch's G̃·v is summed over micro-batches "
        "of this many rows (exact, the same label draws; bounds the product's activations), and the query stage "
        "forwards this many queries at a time; null = the whole minibatch (a rank's slice in ray.solve_mode=data) "
        "and solver.query_batch_size queries",
    )
    iterations: int = Field(300, ge=0, description="iterations of sni | lissa | astra per query")
    lr: float = Field(1.0, gt=0, description="step size, read as lr_mode says")
    lr_mode: Literal["auto", "relative", "absolute"] = Field(
        "auto",
        description="auto: α = lr / μ̂_max (largest eigenvalue of (P + λI)⁻¹(G̃ + λI)) | relative: α = lr × λ "
        "(Table 3) | absolute: α = lr (Fig 3)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="heavy-ball momentum of ASTRA")
    lr_decay: float = Field(0.9, gt=0, le=1, description="α is multiplied by this every lr_decay_every iterations")
    lr_decay_every: int = Field(100, gt=0, description="iterations between learning-rate decays")
    minibatch_size: int = Field(16, gt=0, description="ℬ: sequences per G̃ minibatch, drawn with replacement")
    lissa_repeats: int = Field(1, gt=0, description="R of LiSSA (R = 1 is SNI)")
    tolerance: float = Field(
        0.0, ge=0, description="stop a query when |Δh| / |h| stays below this for `patience` iterations (0: never)"
    )
    patience: int = Field(10, gt=0, description="iterations of rising h (or of tiny |Δh|) before stopping a query")
    query_batch_size: int = Field(16, gt=0, description="queries solved together, sharing each curvature minibatch")
    state_dtype: Literal["factors", "bfloat16"] = Field(
        "factors", description="storage of the query gradients v, the solver's [Q, D] vectors (iterate, momentum, "
        "product) and the solved directions: factors = factors.dtype | bfloat16, half the bytes (the preconditioner "
        "still runs in factors.dtype, the dot products in float32 at least)",
    )
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
    seed: int = Field(0, description="minibatch sampling and Fisher labels")

    @property
    def query_forward_batch(self) -> int:
        """Queries per forward+backward of the query stage (the runtime's and the planner's rule)."""
        return self.micro_batch_size or self.query_batch_size


class SourceConfig(Section):
    """SOURCE and ASTRA-SOURCE (`solver.name: source | astra-source`; seeds §6-7, docs/design.md "SOURCE").

    The trajectory is recorded while the demo's tiny GPT-2 trains (`model.source: tiny`, into `<run_dir>/trajectory`);
    for `model.source: path | hub` it is a folder written by `source.save_trajectory`, named by `trajectory`.
    """

    num_segments: int = Field(3, gt=0, description="L: equal ranges of optimizer steps (the papers' 3)")
    variant: Literal["exp", "damped"] = Field(
        "exp",
        description="r̄ of `source`: exp form (EK-FAC-SOURCE) | damped (Ḡ + λ_ℓI)⁻¹ (= astra-source at 0 iterations)",
    )
    checkpoints: int = Field(
        6, gt=0, description="checkpoints recorded while the tiny GPT-2 trains, evenly spaced, the last = θ^s"
    )
    trajectory: str | None = Field(
        None, description="trajectory folder for model.source path | hub; null with tiny = <run_dir>/trajectory"
    )


class ScoringConfig(Section):
    """Streaming the corpus against the solved directions (`dastra score`)."""

    top_k: int = Field(10, gt=0, description="documents kept per query")
    batch_size: int = Field(32, gt=0, description="sequences per scoring batch")
    dense: bool = Field(False, description="also write scores/dense.parquet (N documents x Q queries)")
    direction_rank: int | None = Field(
        None, gt=0,
        description="rank kept of each query's direction per module (truncated SVD on the module's owner, "
        "kronfluence's query_gradient_low_rank); null: full rank",
    )
    direction_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="storage of the held directions (the products run in float32, or float64 for a "
        "float64 model and factors.dtype)"
    )
    queries_per_pass: int | None = Field(
        None, gt=0,
        description="queries scored in one pass over the corpus: more take one pass per chunk of this many, one "
        "after another in the same `dastra score` (`dastra plan` prints how many fit); null: every query in one pass",
    )


class ReportConfig(Section):
    """`report.html` (`dastra report`): how much of the run a person is shown."""

    num_queries: int = Field(
        20, gt=0, description="the first queries of topk.parquet that get a section (only they get the per-token pass)"
    )
    max_tokens: int = Field(
        64, gt=0, description="tokens of document text shown: the window holding the most influence"
    )


class ProjectionConfig(Section):
    """Kronecker-factored random projection of per-module gradients (scoring/projection.py)."""

    seed: int = Field(0, description="seed of the random projection matrices")
    whiten: bool = Field(
        True, description="project gradients whitened in the EK-FAC eigenbasis ((Λ+λ)^-1/2) when factors exist"
    )
    out_dim: int = Field(16, gt=0, description="k_out: rows of P_out, per module")
    in_dim: int = Field(16, gt=0, description="k_in: rows of P_in, per module")
    per_module: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="glob -> [out_dim, in_dim] per module, first match wins"
    )


class IndexConfig(Section):
    """The projected gradient store and its faiss index (index/), and `dastra search`."""

    store_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the projected store")
    kind: Literal["auto", "flat", "ivfflat", "ivfpq"] = Field(
        "auto",
        description="auto: flat below ivf_min_documents, ivfflat from there | flat (exact) | ivfflat | ivfpq "
        "(IVF-PQ + exact refine)",
    )
    ivf_min_documents: int = Field(
        100_000, gt=0, description="auto switches from flat to ivfflat at this many documents"
    )
    nlist: int | None = Field(None, gt=0, description="IVF lists; null: 4 sqrt(N)")
    pq_m: int | None = Field(None, gt=0, description="PQ sub-quantizers (must divide the dimension); null: D / 8")
    pq_bits: int = Field(8, gt=0, le=16, description="bits per PQ code")
    norm_bands: int = Field(
        8, gt=0, description="IVF lists = norm bands x spherical k-means of directions, probed by <q,c> + |q| R"
    )
    nprobe: int | None = Field(
        None, gt=0, description="lists probed; null: max(min_nprobe, ceil(probe_fraction x nlist))"
    )
    # One default for ivfflat and ivfpq: the top-10 lie in the few lists of highest bound, a count that grows slowly
    # with N, so a small fraction of many lists or a floor of lists on small stores (docs/results/retrieval.md).
    probe_fraction: float = Field(0.05, gt=0, le=1, description="fraction of the IVF lists probed")
    min_nprobe: int = Field(48, gt=0, description="at least this many lists are probed (all of them on small stores)")
    refine_factor: int = Field(50, gt=0, description="IndexRefine k_factor: PQ candidates re-ranked exactly per result")
    train_size: int = Field(
        65_536, gt=0, description="vectors sampled (evenly) to train the IVF lists and PQ codebooks"
    )
    train_iterations: int = Field(10, gt=0, description="k-means iterations (IVF directions, PQ codebooks)")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: GPU when faiss has one | cpu | gpu (without one: a warning, then CPU)"
    )
    shortlist_factor: int = Field(10, gt=0, description="r: the index returns top_k x r candidates per query")
    rescore: bool = Field(True, description="re-score the candidates exactly with full gradients before the top-k")
    target_recall: float = Field(
        0.95, gt=0, le=1,
        description="IVF: recall@10 against flat the build-time calibration of the probed lists aims at (index/meta.json)",
    )
    recall_sample_fraction: float = Field(
        0.02, gt=0, le=1, description="search: fraction of the store re-scored exactly to estimate the recall"
    )
    recall_sample_min: int = Field(200, gt=0, description="search: at least this many documents in that sample")


class RayConfig(Section):
    """Distributed execution (docs/distributed.md): num_workers > 1, an address or deepspeed.stage > 0 turn it on."""

    address: str | None = Field(
        None, description="a running cluster (host:6379); null = an embedded local Ray on 127.0.0.1"
    )
    num_workers: int = Field(1, gt=0, description="ranks of the DeepSpeed group (fit, solve) and scoring actors")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); false = CPU workers (gloo)")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs per worker bundle, also its torch/BLAS threads")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of an embedded Ray (null: every core of this machine)")
    object_store_mb: int = Field(256, gt=0, description="object store of an embedded Ray, in MB")
    connect_timeout_s: float = Field(30.0, gt=0, description="an unreachable ray.address fails after this many seconds")
    timeout_s: float = Field(1800.0, gt=0, description="longest wait for one distributed step (a collective, a shard)")
    max_restarts: int = Field(2, ge=0, description="restarts after a rank or scoring actor died; "
                              "its step or shard is re-run as often")
    solve_mode: Literal["auto", "queries", "data", "modules"] = Field(
        "auto",
        description="auto: queries on replicated models, data under ZeRO-3 | queries (queries split over ranks) | "
        "data (minibatch slices, all-reduce) | modules (each rank holds its modules' factors and query state, "
        "per-GPU memory falls as 1/N; at most one rank per tracked module)",
    )
    score_mode: Literal["auto", "replicas", "modules"] = Field(
        "auto",
        description="auto: modules under ZeRO-3, replicas otherwise | replicas (independent restartable actors, "
        "each with the whole model and every direction) | modules (the DeepSpeed group: each rank scores its own "
        "batches, each direction is held by its module's owner, per-GPU direction memory falls as 1/N)",
    )


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO for the distributed fit and solve."""

    stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage 0-3 (1 and 2 run as 0: attribution has no optimizer state)"
    )
    config: str | None = Field(None, description="a DeepSpeed JSON; null = configs/ds/zero{stage}.json")


class TrackingConfig(Section):
    """Metrics: always `<run_dir>/metrics.jsonl`, and Weights & Biases."""

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline | online (needs WANDB_API_KEY, else falls back to offline) | disabled"
    )
    project: str = Field("distributed-astra", description="W&B project")
    run_name: str | None = Field(None, description="W&B run name; null = <run dir>-<job>")


class PlanConfig(Section):
    """The memory/time planner (`dastra plan`, docs/gpt2xl.md); `dastra run` refuses a config it says cannot fit."""

    gpus: int | None = Field(None, gt=0, description="GPUs (ranks) in all; null = ray.num_workers")
    gpus_per_node: int = Field(8, gt=0, description="GPUs per node")
    gpu_memory: str | None = Field(
        None, description="memory per GPU, e.g. \"80GB\"; null = this machine's GPU, else its RAM"
    )
    memory_reserve: float = Field(
        0.1, ge=0, lt=1, description="fraction kept free (CUDA context, allocator fragmentation)"
    )
    throughput_tflops: float = Field(200.0, gt=0, description="sustained matmul TFLOP/s per GPU for the time column")
    documents: int | None = Field(
        None, gt=0, description="corpus size when data.corpus cannot be read (null: its row count)"
    )
    tokens_per_document: int | None = Field(None, gt=0, description="null = data.max_length (one full sequence each)")
    hf_config: str | None = Field(
        None, description="a config.json to plan from without weights (e.g. configs/models/gpt2-xl.json)"
    )
    check: bool = Field(True, description="`dastra run` refuses a config whose stages do not fit, before any work")


class OutputConfig(Section):
    """Where a run's artifacts go."""

    run_dir: str = Field("runs/demo", description="the run directory (--run-dir)")


# The LDS harness's solver settings (seeds Table 3; docs/results/convergence.md for ASTRA's step): the defaults of
# `eval.solver`, so `dastra eval lds` and `dastra eval facts` run with them over any run's `solver` section.
EVAL_SOLVER_DEFAULTS: dict[str, object] = {
    "iterations": 200, "minibatch_size": 64, "lr": 0.01, "lr_mode": "absolute", "momentum": 0.9,
    "lr_decay": 0.5, "lr_decay_every": 50, "tolerance": 0.0,
}
# The `solver` keys both eval commands honour; the rest (the method, λ, the curvature product, chunking, held-out
# checks, sampling seed) stay with `solver.*` and the commands' own options (--methods, eval.damping_scale).
EVAL_SOLVER_KEYS = ("iterations", "minibatch_size", "lr", "lr_mode", "momentum", "lr_decay", "lr_decay_every",
                    "tolerance", "patience", "preconditioner_damping")


def _eval_solver_field(key: str) -> tuple[object, object]:
    """`solver.<key>`'s type and constraints, nullable, with the harness's default (null: keep `solver.<key>`)."""
    field = SolverConfig.model_fields[key]
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return annotation | None, Field(
        EVAL_SOLVER_DEFAULTS.get(key), description=f"solver.{key} of `eval lds|facts` (null: the run's solver.{key})"
    )


EvalSolverConfig: type[Section] = create_model(
    "EvalSolverConfig",
    __base__=Section,
    __doc__="Overrides of `solver.*` for `dastra eval lds|facts` (null keeps the run's value; `eval_solver`).",
    **{key: _eval_solver_field(key) for key in EVAL_SOLVER_KEYS},
)


class EvalConfig(Section):
    """The LDS harness and fact tracing (`dastra eval lds|facts`; seeds §9.1, docs/results/lds.md)."""

    num_subsets: int = Field(100, gt=1, description="M: random subsets S_j kept for retraining")
    subset_fraction: float = Field(0.5, gt=0, lt=1, description="β: |S_j| = ⌊βN⌋")
    num_retrain_seeds: int = Field(5, gt=0, description="R: retraining seeds per subset, averaged")
    ensemble_size: int = Field(
        5, gt=0, description="E: models trained on all data, each with its own factors and iHVPs"
    )
    damping_scale: float = Field(
        10.0, gt=0, description="λ = damping_scale × mean(Λ) of each model (the digits sweep, lds.md)"
    )
    damping_sweep: list[float] = Field(default_factory=list, description="extra damping_scale values for the λ sweep")
    solver: EvalSolverConfig = Field(
        default_factory=EvalSolverConfig,
        description="the solver settings of `eval lds` and `eval facts`: the run's `solver` section with these "
        "non-null keys on top (`eval_solver`; defaults: the LDS harness's 200 iterations, ℬ 64, absolute "
        "α = 0.01, momentum 0.9, ×0.5 every 50; seeds Table 3). The LDS's SNI-IF takes its step from eval.sni_lr instead of lr/lr_mode",
    )
    # Not a solver field: no solver.lr_mode is "a multiple of 1/(σ_max(G) + λ) by full-batch power iteration".
    sni_lr: float = Field(
        1.0, gt=0, description="the LDS's SNI-IF step: α = sni_lr / (σ_max(G) + λ), σ_max by power iteration on the "
        "whole training set (eval.solver.lr/lr_mode give ASTRA's step and every step of `eval facts`)",
    )
    trak_dim: int = Field(256, gt=0, description="TRAK projection dimension k (capped at N/2)")
    cache_dir: str = Field(
        "runs/eval", description="retrained models, measurements and scores, keyed by task/recipe/subset/seed"
    )
    results_dir: str = Field(
        "docs/results", description="lds.md, lds.png and lds.json (per-task results, merged across runs)"
    )
    seed: int = Field(0, description="seed of the subsets")
    recipe: dict[str, int | float | list[int]] = Field(
        default_factory=dict, description="overrides of the task's recipe fields, e.g. {epochs: 10}"
    )
    facts_methods: list[str] = Field(
        default_factory=lambda: ["graddot", "ekfac", "astra"], description="methods of `dastra eval facts`"
    )


def eval_solver(cfg: Config, **updates: object) -> SolverConfig:
    """THE solver settings of `dastra eval lds` and `dastra eval facts`: the run's `solver` section with the non-null
    keys of `eval.solver` and then `updates` (a method's name, the LDS's per-method step) on top, validated."""
    overrides = {k: v for k, v in cfg.eval.solver.model_dump().items() if v is not None}
    try:
        return SolverConfig.model_validate({**cfg.solver.model_dump(), **overrides, **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DastraError(f"eval solver settings: solver.{err['loc'][0]}: {err['msg']}") from None


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


def _section_type(annotation: object) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _flow(value: object) -> str:
    """One YAML value on one line (a string quoted only where YAML needs it)."""
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=10**6).strip()[1:-1]


def describe_keys(section: type[Section] | None = None, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, description) of every leaf key, in declaration order."""
    section = section or Config
    rows: list[tuple[str, object, str]] = []
    for name, field in section.model_fields.items():
        child = _section_type(field.annotation)
        if child is not None:
            rows.extend(describe_keys(child, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, default, field.description or ""))
    return rows


def config_yaml(cfg: Config, section: Section | None = None, indent: int = 0) -> str:
    """`cfg` as YAML that `load_config` reads back, every key commented with its description, and with its default
    where `cfg` differs from it (`dastra config --show`, `<run_dir>/config.yaml`)."""
    section = section if section is not None else cfg
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if _section_type(field.annotation) is not None:
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{name}:" + (f"  # {doc[0]}" if doc else ""))
            lines.append(config_yaml(cfg, value, indent + 1))
            continue
        dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else json.loads(json.dumps(value))
        default = json.loads(json.dumps(field.get_default(call_default_factory=True)))
        note = field.description or ""
        if dumped != default:
            note += f" (default: {_flow(default)})"
        lines.append(f"{pad}{name}: {_flow(dumped)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


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


def resolve_config_path(path: str | Path) -> Path:
    """`path` as given when it exists (or is absolute); else the shipped config it names: `configs/X` or `X` relative
    to `CONFIGS_DIR`. A path found nowhere is returned unchanged, so the error names what the user typed."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = CONFIGS_DIR.joinpath(*parts) if parts else CONFIGS_DIR
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (the embedded `configs/tiny.yaml` when None), apply `a.b=c` overrides, validate.

    A relative path missing from the working directory falls back to the shipped configs (`resolve_config_path`)."""
    path = resolve_config_path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise DastraError(
            f"config file '{path}' not found; pass --config configs/tiny.yaml, configs/gpt2xl.yaml or another YAML file"
        )
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
