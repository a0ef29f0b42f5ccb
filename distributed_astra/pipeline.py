"""The pipeline: one function per stage, each reading the previous stage's artifacts. fit, solve and score run
in this process, or on Ray workers under DeepSpeed when `ray.num_workers > 1` (distributed/stages.py).

    prepare -> fit -> query -> solve -> score -> report    (`run` does them all, plus solver.baselines)
    index / search                                        (projected gradient store + faiss, index/stages.py)

Run directory layout (docs/design.md, "Artifacts"):
    data/corpus.parquet, data/queries.parquet   the demo corpus (data.corpus / data.queries = demo)
    model/                                      the demo's tokenizer and tiny GPT-2 (model.source = tiny)
    factors/                                    EK-FAC factors (safetensors) + meta.json
    queries/                                    query gradients + meta.json
    trajectory/                                 the tiny GPT-2's training trajectory (SOURCE, source/trajectory.py)
    source/segment_<ℓ>/                         SOURCE's segment-averaged EK-FAC factors (source/stages.py)
    ihvp/<solver>/                              solved directions (G + λI)⁻¹∇f + meta.json (+ trace.parquet);
                                                source | astra-source: directions_segment<ℓ>.safetensors
    topk.parquet, scores/                       solver.name's top-k (scores/: shard manifest, dense scores)
    baselines/<solver>/                         the same for each solver.baselines entry
    summary.json, report.html, metrics.jsonl, wandb/
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from torch import nn
from transformers import PreTrainedTokenizerBase

import distributed_astra
from distributed_astra.artifacts import (
    DIRECTIONS_FILE,
    atomic_path,
    check_meta,
    differing_field,
    ensure_writable_dir,
    load_tensors,
    meta_matches,
    open_tensors,
    read_directions,
    read_meta,
    save_tensors,
    write_json,
)
from distributed_astra.config import SOURCE_SOLVERS, Config, config_yaml
from distributed_astra.curvature.covariance import product_dtype
from distributed_astra.curvature.factors import EkfacFactors, fit_ekfac, load_factors, model_fingerprint, save_factors
from distributed_astra.data.corpus import Corpus, CorpusStats, corpus_files, open_corpus
from distributed_astra.data.demo_corpus import build_demo_corpus
from distributed_astra.data.sequences import (
    QueryId,
    SequenceFormat,
    encode_query,
    iter_query_batches,
    iter_training_batches,
    load_queries,
    shuffled_epochs,
)
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.distributed import is_distributed
from distributed_astra.errors import DastraError
from distributed_astra.eval.facts import fact_recall
from distributed_astra.ihvp.ekfac import default_damping
from distributed_astra.ihvp.products import FisherProduct, GGNProduct, label_generator
from distributed_astra.ihvp.monitor import heldout_summary
from distributed_astra.ihvp.solvers import MinibatchSampler, SolveResult, ekfac_preconditioner
from distributed_astra.ihvp.solvers import solve as solve_ihvp
from distributed_astra.models.load import check_context_length, context_length, load_causal_lm, load_tokenizer
from distributed_astra.models.modules import TrackedModule, select_tracked_modules
from distributed_astra.models.tiny import build_tiny_gpt2, tiny_optimizer_settings, train_tiny_gpt2
from distributed_astra.progress import console, progress_bar
from distributed_astra.scoring.gradients import captured_batches, query_gradients
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.scoring.topk import StreamingTopK
from distributed_astra.source.trajectory import TrajectoryRecorder, save_trajectory
from distributed_astra.tracking import SolveLogger, Tracker, metered, train_logger

STAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RunPaths:
    """Where a run's artifacts live. `baseline` names a `solver.baselines` entry: its scores and top-k go under
    baselines/<name>/ so the primary solver's topk.parquet (the one the report shows) is never overwritten."""

    root: Path
    baseline: str | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def factors(self) -> Path:
        return self.root / "factors"

    @property
    def queries(self) -> Path:
        return self.root / "queries"

    @property
    def trajectory(self) -> Path:
        return self.root / "trajectory"

    def source_factors(self, segment: int) -> Path:
        return self.root / "source" / f"segment_{segment}"

    def ihvp(self, solver: str) -> Path:
        return self.root / "ihvp" / solver

    @property
    def results(self) -> Path:
        return self.root if self.baseline is None else self.root / "baselines" / self.baseline

    @property
    def scores(self) -> Path:
        return self.results / "scores"

    @property
    def topk(self) -> Path:
        return self.results / "topk.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


@dataclass
class Context:
    """What every stage needs: the config, where things live, the model and its tracked modules."""

    cfg: Config
    paths: RunPaths
    corpus: Path
    queries: Path
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    tracked: dict[str, TrackedModule]
    fingerprint: str
    tracker: Tracker
    memo: dict[str, object] = field(default_factory=dict)  # per command: the corpus fingerprint, notes printed

    @property
    def stat_dtype(self) -> torch.dtype:
        return STAT_DTYPES[self.cfg.factors.dtype]

    @property
    def sequence_format(self) -> SequenceFormat:
        return SequenceFormat.from_data(self.cfg.data)

    def open_corpus(self) -> Corpus:
        """`data.corpus` with its columns and split (data/corpus.py)."""
        return open_corpus(self.corpus, self.cfg.data.text_column, self.cfg.data.id_column, self.cfg.data.split)

    def training_batches(self, batch_size: int, max_sequences: int | None = None):
        """One pass over the corpus's sequences; the first pass of a command that skips rows (empty, not UTF-8) says
        how many, once."""
        stats = CorpusStats()
        batches = iter_training_batches(
            self.open_corpus(),
            self.tokenizer,
            self.sequence_format,
            batch_size,
            max_sequences=max_sequences,
            text_column=self.cfg.data.text_column,
            id_column=self.cfg.data.id_column,
            stats=stats,
        )
        yield from batches
        if stats.skipped and not self.memo.get("skipped_reported"):
            self.memo["skipped_reported"] = True
            warn_skipped_rows(self.corpus, stats.skipped_empty, stats.skipped_non_utf8)

    def versions(self) -> dict[str, str]:
        return {
            "distributed_astra": distributed_astra.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        }

    def model_meta(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "tracked_modules": list(self.tracked)}

    @property
    def distributed(self) -> bool:
        """fit, solve and score run on Ray workers under DeepSpeed (docs/distributed.md)."""
        return is_distributed(self.cfg)


def distributed_stages():
    """distributed/stages.py, imported on first use: Ray and DeepSpeed load only for distributed runs."""
    from distributed_astra.distributed import stages

    return stages


def _prepare_demo_data(cfg: Config, paths: RunPaths) -> tuple[Path, Path]:
    demo_corpus, demo_queries = paths.data / "corpus.parquet", paths.data / "queries.parquet"
    if (cfg.data.corpus == "demo" or cfg.data.queries == "demo") and not (
        demo_corpus.is_file() and demo_queries.is_file()
    ):
        console.print(f"building the demo corpus in {paths.data}")
        build_demo_corpus(paths.data, cfg.data.num_stdlib_docs, cfg.data.num_facts, cfg.data.seed)
    corpus = demo_corpus if cfg.data.corpus == "demo" else Path(cfg.data.corpus)
    queries = demo_queries if cfg.data.queries == "demo" else Path(cfg.data.queries)
    corpus_files(corpus, cfg.data.split)  # a file, a glob or a dataset folder (data/corpus.py); raises naming it
    if not queries.is_file():
        raise DastraError(f"data.queries: file '{queries}' not found; point data.queries at a Parquet file or use 'demo'")
    return corpus, queries


def _train_tiny_model(cfg: Config, paths: RunPaths, corpus: Path, tracker: Tracker | None = None) -> None:
    """Tokenizer and tiny GPT-2 into `model/`, and the training trajectory (`source.checkpoints` checkpoints evenly
    spaced over the steps, the last one the final model) into `trajectory/` for SOURCE (seeds §6.3). `tracker` gets
    the training under train/* against train/step (loss, lr, grad norm, tokens/s; tracking.train_logger)."""
    tiny = cfg.model.tiny
    documents = open_corpus(corpus, cfg.data.text_column, cfg.data.id_column, cfg.data.split)
    with atomic_path(paths.model) as tmp:
        tokenizer = train_bpe_tokenizer((d.text for d in documents.iter_documents()), tiny.vocab_size, tmp)
        model = build_tiny_gpt2(len(tokenizer), tiny.n_layer, tiny.n_head, tiny.n_embd, cfg.data.max_length, tiny.seed)
        batches = shuffled_epochs(
            documents,
            tokenizer,
            SequenceFormat.from_data(cfg.data),
            tiny.train_batch_size,
            tiny.seed,
            text_column=cfg.data.text_column,
            id_column=cfg.data.id_column,
        )
        num_sequences = sum(len(b["input_ids"]) for b in batches(0))
        recorder = TrajectoryRecorder(
            tiny_optimizer_settings(), tiny.train_batch_size, num_sequences, {"recipe": "tiny GPT-2", "seed": tiny.seed}
        )
        count = min(cfg.source.checkpoints, tiny.train_steps)
        checkpoint_steps = {round(i * tiny.train_steps / count) for i in range(1, count + 1)}
        with progress_bar("train tiny GPT-2", tiny.train_steps, "steps") as advance, (
            tracker.stage("train") if tracker is not None else nullcontext()
        ):
            losses = train_tiny_gpt2(
                model, batches, tiny.train_steps, tiny.learning_rate, tiny.seed, on_step=lambda step, loss: advance(1),
                trajectory=recorder, checkpoint_steps=checkpoint_steps,
                on_metrics=train_logger(tracker) if tracker is not None else None,
            )
        save_trajectory(recorder.trajectory, paths.trajectory)  # before the model folder appears: both or neither
        model.save_pretrained(tmp)
    console.print(f"tiny GPT-2 trained: final loss {losses[-1]:.3f}, saved to {paths.model}")


def open_context(cfg: Config, job: str) -> Context:
    """Resolve data and model (building the demo's corpus and tiny GPT-2 when absent), choose tracked modules."""
    paths = RunPaths(Path(cfg.output.run_dir))
    ensure_writable_dir(paths.root)  # a read-only or unwritable run directory is refused before any work
    if is_distributed(cfg):
        distributed_stages().validate(cfg)
    corpus, queries = _prepare_demo_data(cfg, paths)
    tracker = None
    if cfg.model.source == "tiny":
        if not (paths.model / "config.json").is_file():
            tracker = Tracker(paths.root, cfg.tracking, cfg.model_dump(mode="json"), job)  # logs the training
            _train_tiny_model(cfg, paths, corpus, tracker)
        model_path, hub_id = str(paths.model), None
    else:
        model_path, hub_id = (cfg.model.path, None) if cfg.model.source == "path" else (None, cfg.model.hub_id)
        if cfg.model.source == "path" and not cfg.model.path:
            raise DastraError("model.path is empty: set it to a local HF model folder (model.source is 'path')")
    model = load_causal_lm(model_path, hub_id, cfg.model.dtype)
    check_context_length(model, cfg.data.max_length)
    tokenizer = load_tokenizer(model_path, hub_id)
    if job != "index":  # every stage but index reads the queries: a bad one is refused before any work
        check_queries(cfg, queries, model, tokenizer)
    tracked = select_tracked_modules(model, cfg.model.tracked_modules)
    with atomic_path(paths.root / "config.yaml") as tmp:  # what this command ran with, readable by --config
        tmp.write_text(config_yaml(cfg) + "\n")
    tracker = tracker or Tracker(paths.root, cfg.tracking, cfg.model_dump(mode="json"), job)
    return Context(cfg, paths, corpus, queries, model, tokenizer, tracked, model_fingerprint(model, tracked), tracker)


def warn_skipped_rows(corpus: Path | str, empty: int, non_utf8: int) -> None:
    """The one line every corpus pass prints when it skipped rows (data/corpus.py, `CorpusStats`)."""
    console.print(
        f"[yellow]warning:[/] skipped {empty + non_utf8} rows of data.corpus '{corpus}': {empty} empty, "
        f"{non_utf8} not UTF-8",
        highlight=False, soft_wrap=True,
    )


def check_queries(cfg: Config, queries_path: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every query has a prompt and a completion with tokens, and prompt + completion fits in the model's positions
    and in data.max_length: checked when a command opens, so that a bad query stops it before the fit."""
    limit, max_length = context_length(model), cfg.data.max_length
    where = f"data.queries '{queries_path}'"
    for q in load_queries(queries_path):
        try:
            prompt, completion = encode_query(q, tokenizer)
        except DastraError as exc:
            raise DastraError(f"{where}: {exc}") from None
        tokens = len(prompt) + len(completion)
        size = f"query {q.query_id} is {tokens} tokens (prompt {len(prompt)} + completion {len(completion)})"
        if limit is not None and tokens > limit:
            raise DastraError(
                f"{where}: {size}, more than the model's context of {limit} positions: shorten its prompt or "
                f"completion to {limit} tokens in all"
            )
        if tokens > max_length:
            raise DastraError(
                f"{where}: {size}, more than data.max_length={max_length}: shorten the query or raise "
                f"data.max_length to at least {tokens}" + (f" (the model has {limit} positions)" if limit else "")
            )


CORPUS_SETTINGS = ("corpus", "text_column", "id_column", "split", "max_length", "long_documents", "add_eos")


def corpus_meta(ctx: Context) -> dict[str, object]:
    """What every artifact computed from the corpus depends on: the data settings that make its sequences (one field
    each, so that a mismatch is named) and a fingerprint of the corpus files (names, row counts, sizes)."""
    if "corpus_fingerprint" not in ctx.memo:
        data = ctx.cfg.data
        corpus = open_corpus(ctx.corpus, data.text_column, data.id_column, data.split)
        files = [(Path(f.path).name, f.num_rows, os.path.getsize(f.path)) for f in corpus.files]
        ctx.memo["corpus_fingerprint"] = hashlib.sha256(repr(files).encode()).hexdigest()[:16]
    data = ctx.cfg.data
    settings = {f"data.{name}": getattr(data, name) for name in CORPUS_SETTINGS if hasattr(data, name)}
    return {**settings, "corpus_fingerprint": ctx.memo["corpus_fingerprint"]}


def factor_meta(ctx: Context) -> dict[str, object]:
    # data.queries does not enter the factors: solving new queries (`dastra search --queries`) reuses them.
    corpus_only = ctx.cfg.model_copy(update={"data": ctx.cfg.data.model_copy(update={"queries": ""})})
    return {**ctx.model_meta(), **corpus_meta(ctx), "config_hash": corpus_only.section_hash("data", "factors")}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def query_meta(ctx: Context) -> dict[str, object]:
    """What the query gradients depend on: the model, the queries file (path and content) and the statistics dtype."""
    if "queries_digest" not in ctx.memo:
        ctx.memo["queries_digest"] = _file_digest(ctx.queries)
    return {
        **ctx.model_meta(), "queries": str(ctx.queries), "queries_digest": ctx.memo["queries_digest"],
        "factors.dtype": ctx.cfg.factors.dtype,
    }


def directions_meta(ctx: Context) -> dict[str, object]:
    """What solved directions depend on: everything the factors do (model, corpus, data and factors settings) and the
    queries. `score` refuses directions whose record differs from the current config, naming the field."""
    return {**factor_meta(ctx), **{k: v for k, v in query_meta(ctx).items() if k not in ctx.model_meta()}}


def check_directions(ctx: Context) -> None:
    """Before scoring: the directions of `solver.name` were solved for this model, corpus, data settings and queries
    (else topk.parquet would silently describe another run than summary.json and report.html)."""
    solver_dir = ctx.paths.ihvp(ctx.cfg.solver.name)
    found = read_meta(solver_dir, "solved directions", "solve")
    differing = differing_field(found, directions_meta(ctx))
    if differing is not None:
        key, was, want = differing
        raise DastraError(
            f"solved directions '{solver_dir}': field '{key}' is {json.dumps(was)} but this run has "
            f"{json.dumps(want)}: score with the settings of the solve, or re-run `dastra fit`, `dastra query` and "
            f"`dastra solve --solver {ctx.cfg.solver.name}` with these"
        )


def _reused(ctx: Context, name: str) -> tuple[bool, object]:
    """`dastra run` reuses fit's and query's artifacts when they were made for the same model, corpus and settings
    (their meta.json agrees with what the stage would write), as the single stages check before reading them."""
    if name == "fit":
        expected = {**factor_meta(ctx), "dtype": ctx.cfg.factors.dtype}
        if meta_matches(ctx.paths.factors, expected):
            try:
                factors = load_factors(ctx.paths.factors, expected)
            except DastraError as exc:
                console.print(f"[yellow]warning:[/] {exc}: fitting again", highlight=False, soft_wrap=True)
                return False, None
            console.print("reusing factors/ (same model, corpus and factors settings)", highlight=False)
            return True, factors
    if name == "query" and meta_matches(ctx.paths.queries, query_meta(ctx)):
        if (ctx.paths.queries / "gradients.safetensors").is_file():
            console.print("reusing queries/ (same model and queries)", highlight=False)
            return True, None
    return False, None


@metered("fit")
def fit(ctx: Context) -> EkfacFactors:
    """Two passes over the corpus: covariances A, S, then the eigenvalue correction Λ (seeds §3)."""
    if ctx.distributed:
        return distributed_stages().fit(ctx)
    cfg = ctx.cfg.factors
    num_sequences = sum(len(b["doc_id"]) for b in ctx.training_batches(cfg.batch_size, cfg.max_sequences))
    if num_sequences == 0:
        raise DastraError(f"data.corpus '{ctx.corpus}' yields no token sequences; give it non-empty documents")
    with progress_bar("fit EK-FAC (2 passes)", 2 * num_sequences, "seq") as advance:
        factors = fit_ekfac(
            ctx.model,
            ctx.tracked,
            lambda: ctx.training_batches(cfg.batch_size, cfg.max_sequences),
            ctx.stat_dtype,
            cfg.seed,
            on_batch=lambda part, rows, log=ctx.tracker.progress("fit", num_sequences): (advance(rows), log(part, rows)),
        )
    save_factors(factors, ctx.paths.factors, {**factor_meta(ctx), "dtype": cfg.dtype, "versions": ctx.versions()})
    ctx.tracker.log({"fit/num_sequences": num_sequences, "fit/mean_lambda": default_damping(factors) / 0.1})
    ctx.tracker.count(tokens=2 * factors.num_tokens, sequences=2 * num_sequences)  # two passes
    return factors


@metered("query")
def query(ctx: Context) -> None:
    """∇θ f(z_q) on the completion tokens of every query, saved per module."""
    queries = load_queries(ctx.queries)
    batches = _counted(iter_query_batches(queries, ctx.tokenizer, ctx.cfg.solver.query_batch_size), ctx.tracker)
    with progress_bar("query gradients", len(queries), "queries") as advance:
        _, grads = query_gradients(ctx.model, ctx.tracked, batches, ctx.stat_dtype, on_batch=advance)
    ids = [q.query_id for q in queries]
    with atomic_path(ctx.paths.queries) as tmp:
        tmp.mkdir()
        save_tensors(grads, tmp / "gradients.safetensors")
        write_json(
            tmp / "meta.json",
            {**query_meta(ctx), "num_queries": len(ids), "query_ids": ids},
        )


def load_query_gradients(ctx: Context) -> tuple[list[QueryId], dict[str, torch.Tensor]]:
    """(query ids as the queries file gives them, {module: [Q, out, in+1]}) of the query stage."""
    meta = read_meta(ctx.paths.queries, "query gradients", "query")
    check_meta(meta, query_meta(ctx), "query gradients", "query")
    return meta["query_ids"], load_tensors(ctx.paths.queries / "gradients.safetensors", "query gradients", "query")


def load_directions(ctx: Context, solver: str | None = None) -> tuple[list[QueryId], dict[str, torch.Tensor]]:
    """(query ids, {module: [Q, out, in+1]}) of the directions solved by `solver` (default `solver.name`)."""
    return read_directions(ctx.paths.ihvp(solver or ctx.cfg.solver.name), ctx.model_meta())


def solver_logger(ctx: Context, name: str | None = None) -> SolveLogger:
    """The W&B layout of one method's solve (`solver.name` by default; tracking.SolveLogger): per iteration, the
    aggregates over each chunk's running queries against ONE `solve/<name>/iteration` axis counting across chunks
    (`chunk(query_ids)` gives a chunk's callbacks); the per-query trace once, as a table and one chart (`finish`)."""
    return SolveLogger(ctx.tracker, name or ctx.cfg.solver.name)


def heldout_batch(ctx: Context, sampler: MinibatchSampler | None) -> dict[str, torch.Tensor] | None:
    """The fixed held-out curvature batch of the solvers' convergence signal: `solver.heldout_batch_size` rows of
    the sampler's pool drawn once by a generator of its own (seed + 1), so the solve's minibatch stream is the same
    with or without it; None when `solver.heldout_every` is 0 or the solver draws no minibatches."""
    cfg = ctx.cfg.solver
    if sampler is None or cfg.heldout_every == 0:
        return None
    return sampler.draw(cfg.heldout_batch_size, torch.Generator().manual_seed(cfg.seed + 1))


def _counted(batches, tracker: Tracker):
    """The minibatches, each counted into the running stage's throughput (sequences, tokens)."""
    for batch in batches:
        tracker.count(sequences=int(batch["input_ids"].shape[0]), tokens=int(batch["attention_mask"].sum()))
        yield batch


def curvature_minibatches(ctx: Context) -> tuple[GGNProduct | FisherProduct, MinibatchSampler]:
    """G̃·v of the iterative solvers (`solver.product`) at the model's current weights, and the minibatches it runs
    on: `solver.minibatch_size` sequences drawn with replacement from the first `factors.max_sequences`."""
    cfg = ctx.cfg.solver
    product = (
        GGNProduct(ctx.model, ctx.tracked)
        if cfg.product == "ggn"
        else FisherProduct(ctx.model, ctx.tracked, cfg.fisher_samples, label_generator(ctx.model, cfg.seed))
    )
    sequences = ctx.training_batches(ctx.cfg.factors.batch_size, ctx.cfg.factors.max_sequences)
    return product, MinibatchSampler(sequences, cfg.minibatch_size, torch.Generator().manual_seed(cfg.seed))


@metered(lambda ctx: f"solve/{ctx.cfg.solver.name}")
def solve(ctx: Context) -> float:
    """(G + λI)⁻¹∇f for every query with the configured solver (seeds §3-5); returns the damping λ used.

    Iterative solvers share each curvature minibatch across a chunk of `solver.query_batch_size` queries; their
    minibatches are drawn with replacement from the corpus sequences (the first `factors.max_sequences`).
    `source` / `astra-source` solve per segment of the training trajectory (source/stages.py, seeds §6-7).
    """
    if ctx.distributed:
        return distributed_stages().solve(ctx)
    cfg = ctx.cfg.solver
    if cfg.name in SOURCE_SOLVERS:
        from distributed_astra.source import stages as source_stages

        return source_stages.solve(ctx)
    factors = load_factors(ctx.paths.factors, factor_meta(ctx))
    ids, grads = load_query_gradients(ctx)
    damping = default_damping(factors) if cfg.damping == "auto" else float(cfg.damping)
    preconditioner = ekfac_preconditioner(factors, cfg, damping, ctx.cfg.factors.strategy)
    product, sampler = None, None
    if cfg.name != "ekfac":  # the iterative solvers need G̃·v on minibatches of the corpus
        product, sampler = curvature_minibatches(ctx)
    heldout = heldout_batch(ctx, sampler)
    batches = _counted(sampler, ctx.tracker) if sampler is not None else None
    starts = range(0, len(ids), cfg.query_batch_size)
    iterative = cfg.name != "ekfac"
    steps_per_chunk = cfg.iterations * (cfg.lissa_repeats if cfg.name == "lissa" else 1) if iterative else 1
    results: list[SolveResult] = []
    logger = solver_logger(ctx) if iterative else None
    solve_seconds = 0.0
    with progress_bar(f"solve ({cfg.name})", len(starts) * steps_per_chunk, "it") as advance:
        for start in starts:
            chunk_ids = ids[start : start + cfg.query_batch_size]
            log, log_heldout = logger.chunk(chunk_ids) if logger is not None else (None, None)
            done = [0]

            def on_iteration(iteration, objective, residual, lr, log=log, done=done):
                log(iteration, objective, residual, lr)
                ctx.tracker.count(query_iterations=int(torch.isfinite(objective).sum()))
                done[0] += 1
                advance(1)

            started = time.perf_counter()
            result = solve_ihvp(
                {name: g[start : start + len(chunk_ids)] for name, g in grads.items()},
                preconditioner,
                product,
                batches,
                cfg,
                damping,
                query_ids=[str(q) for q in chunk_ids],
                on_iteration=on_iteration,
                heldout=heldout,
                on_heldout=log_heldout,
            )
            solve_seconds += time.perf_counter() - started
            for message in result.messages:
                console.print(f"[yellow]warning:[/] {message}", highlight=False)
            results.append(result)
            advance(steps_per_chunk - done[0])  # the chunk's queries may all stop before the iteration cap
    directions = {name: torch.cat([r.x[name] for r in results]) for name in grads}
    statuses = [status for r in results for status in r.status]
    trace = pa.concat_tables([r.table() for r in results]) if iterative else None
    held = pa.concat_tables([r.heldout_table() for r in results]) if heldout is not None else None
    heldout_info = heldout_meta(cfg, sum(r.heldout_seconds for r in results), solve_seconds) if held else None
    out = ctx.paths.ihvp(cfg.name)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_tensors(directions, tmp / DIRECTIONS_FILE)
        if trace is not None:
            pq.write_table(trace, tmp / "trace.parquet")
        if held is not None:
            pq.write_table(held, tmp / "heldout.parquet")
        write_json(
            tmp / "meta.json",
            {
                **directions_meta(ctx),
                "solver": cfg.model_dump(mode="json"),
                "damping": damping,
                "status": {s: statuses.count(s) for s in sorted(set(statuses))},
                "query_ids": ids,
                **({"heldout": heldout_info} if heldout_info else {}),
            },
        )
    if logger is not None:
        logger.finish(trace, held)
    ctx.tracker.log({
        f"solve/{cfg.name}/damping": damping, **{f"solve/{cfg.name}/num_{s}": statuses.count(s) for s in set(statuses)},
        **({f"solve/{cfg.name}/heldout/cost_fraction": heldout_info["cost_fraction"]} if heldout_info else {}),
    })
    return damping


def heldout_meta(cfg, heldout_seconds: float, solve_seconds: float) -> dict[str, float | int]:
    """meta.json's record of the held-out evaluation: its settings and what it cost, as a fraction of the solve
    (the solver calls' wall time, which includes it)."""
    return {
        "every": cfg.heldout_every,
        "batch_size": cfg.heldout_batch_size,
        "seconds": heldout_seconds,
        "solve_seconds": solve_seconds,
        "cost_fraction": heldout_seconds / solve_seconds if solve_seconds > 0 else 0.0,
    }


def topk_table(ctx: Context, query_ids: list[QueryId], scores: torch.Tensor, keys: torch.Tensor) -> pa.Table:
    """topk.parquet's table (query_id, rank, doc_id, score, text) from [Q, k] scores and document keys, with the
    ids as the queries file and the corpus give them; written atomically."""
    corpus = ctx.open_corpus()
    flat = keys.flatten().tolist()
    texts, doc_ids = corpus.texts(flat), corpus.doc_ids(flat)
    k = scores.shape[1]
    table = pa.table(
        {
            "query_id": [q for q in query_ids for _ in range(k)],
            "rank": torch.arange(1, k + 1).repeat(len(query_ids)).numpy(),
            "doc_id": [doc_ids[key] for key in flat],
            "score": scores.flatten().numpy(),
            "text": [texts.get(key, "") for key in flat],
        }
    )
    with atomic_path(ctx.paths.topk) as tmp:
        pq.write_table(table, tmp)
    return table


def _direction_scores(
    ctx: Context, compute: torch.dtype, num_sequences: int
) -> tuple[list[QueryId], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """(query ids, an iterator of (document keys, sequence scores [B, Q]) per corpus batch) for `solver.name`'s
    directions at the loaded model: one streamed pass."""
    query_ids, tensors = load_directions(ctx)
    directions = {name: x.to(compute) for name, x in tensors.items()}

    def stream():
        with progress_bar("score corpus", num_sequences, "seq") as advance:
            for batch, capture in captured_batches(
                ctx.model, ctx.tracked, ctx.training_batches(ctx.cfg.scoring.batch_size), compute
            ):
                yield batch["doc_id"], sequence_scores(capture.output_grads, capture.activations, directions)
                advance(len(batch["doc_id"]))

    return query_ids, stream()


@metered(lambda ctx: f"score/{ctx.cfg.solver.name}")
def score(ctx: Context) -> pa.Table:
    """Stream the corpus: τ(z_q, z_m) = X_qᵀ ∇L(z_m) per document, keeping the top-k per query (seeds §1, Eq 2).
    `source` / `astra-source`: τ = Σ_ℓ mean_c w_ℓᵀ ∇L(θ_c, z_m), one pass per checkpoint (source/stages.py)."""
    check_directions(ctx)  # before any work: directions of another corpus, data setting or queries are refused
    if ctx.distributed:
        return distributed_stages().score(ctx)
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    num_sequences = num_tokens = 0
    for batch in ctx.training_batches(ctx.cfg.scoring.batch_size):
        num_sequences += len(batch["doc_id"])
        num_tokens += int(batch["attention_mask"].sum())
    started = time.perf_counter()
    scope = f"score/{ctx.cfg.solver.name}"
    ctx.tracker.define_axis(scope, f"{scope}/batch")
    if ctx.cfg.solver.name in SOURCE_SOLVERS:
        from distributed_astra.source import stages as source_stages

        query_ids, scored = source_stages.summed_scores(ctx, compute, num_sequences)
    else:
        query_ids, scored = _direction_scores(ctx, compute, num_sequences)
    top = StreamingTopK(len(query_ids), ctx.cfg.scoring.top_k, keep_all=ctx.cfg.scoring.dense)
    for batch_number, (doc_ids, scores) in enumerate(scored, 1):
        top.update(doc_ids, scores)
        ctx.tracker.log({f"{scope}/batch": batch_number, f"{scope}/sequences": top.num_documents,
                         f"{scope}/fraction": top.num_documents / max(1, num_sequences),
                         f"{scope}/sequences_per_s_so_far": top.num_documents / max(time.perf_counter() - started, 1e-9)})
    scores, doc_ids = top.finish()
    table = topk_table(ctx, query_ids, scores, doc_ids)
    if ctx.cfg.scoring.dense:
        all_keys, all_scores = top.all_scores()
        doc_ids = ctx.open_corpus().doc_ids(all_keys.tolist())
        dense = pa.table({
            "doc_id": [doc_ids[key] for key in all_keys.tolist()],
            **{f"q{q}": all_scores[:, i].numpy() for i, q in enumerate(query_ids)},
        })
        with atomic_path(ctx.paths.scores / "dense.parquet") as tmp:
            pq.write_table(dense, tmp)
    ctx.tracker.log({f"{scope}/num_documents": top.num_documents, f"{scope}/num_queries": len(query_ids)})
    ctx.tracker.count(sequences=num_sequences, tokens=num_tokens)
    return table


def print_topk(table: pa.Table, queries_path: Path, show: int) -> None:
    """A readable table: each query's prompt and completion, then its top documents."""
    from rich.table import Table

    prompts = {q.query_id: q for q in load_queries(queries_path)}
    rows = table.to_pylist()
    for query_id in dict.fromkeys(r["query_id"] for r in rows):
        q = prompts.get(query_id)
        title = f"query {query_id}: {q.prompt!r} -> {q.completion!r}" if q else f"query {query_id}"
        view = Table(title=title, title_justify="left", show_lines=False)
        for column in ("rank", "doc_id", "score", "text"):
            view.add_column(column, overflow="ellipsis", no_wrap=column == "text", max_width=90 if column == "text" else None)
        for r in [r for r in rows if r["query_id"] == query_id][:show]:
            marker = " *" if q and q.fact_doc_id == r["doc_id"] else ""
            view.add_row(str(r["rank"]), f"{r['doc_id']}{marker}", f"{r['score']:.4g}", r["text"].replace("\n", " ")[:200])
        console.print(view)


def index(ctx: Context) -> dict[str, object]:
    """Projected gradient store (Arrow IPC shards) + faiss index over it (index/stages.py)."""
    from distributed_astra.index import stages  # faiss loads only for these stages

    return stages.index(ctx)


def search(ctx: Context) -> pa.Table:
    """Shortlist from the faiss index, exact re-score, top-k per query into search/topk.parquet (index/stages.py)."""
    from distributed_astra.index import stages

    return stages.search(ctx)


@metered("report")
def report(ctx: Context) -> Path:
    """Per-token attribution of the shown queries' top-k documents, then the self-contained `report.html`."""
    from distributed_astra.curvature.factors import FACTORS_FILE
    from distributed_astra.report.build import build_report  # matplotlib and jinja2 load only for this stage

    with open_tensors(ctx.paths.factors / FACTORS_FILE, "EK-FAC factors", "fit"):
        pass  # the spectra come last: a missing or damaged factors file is refused before the attribution pass
    return build_report(ctx)


def _log_stage_result(ctx: Context, name: str, result: object, seconds: float) -> None:
    """W&B views of a finished stage (its seconds, memory and throughput come from `metered`): the eigen-spectrum
    (log10 Λ) per module after fit; the top-k table of the scoring method under score/<method>/topk."""
    if name == "fit" and isinstance(result, EkfacFactors):
        for module in result.names:
            ctx.tracker.histogram(f"fit/spectrum/{module}", torch.log10(result[module].lambda_.clamp_min(1e-30)))
    if name == "score" and isinstance(result, pa.Table):
        ctx.tracker.table(
            f"score/{ctx.cfg.solver.name}/topk", {column: result.column(column).to_pylist() for column in result.column_names}
        )


def _wandb_summary(summary: dict[str, object]) -> dict[str, object]:
    """summary.json as the W&B run summary: fact tracing of solver.name at the top level (recall@1, recall@10, mrr),
    each method's figures under `<method>/` (fact tracing, objective and held-out objective, damping, seconds),
    the stages' seconds under `seconds/`."""
    figures: dict[str, object] = {"solver": summary["solver"], "num_queries": summary["num_queries"]}
    methods = {str(summary["solver"]): {k: v for k, v in summary.items() if k not in ("baselines", "seconds", "solver")},
               **summary.get("baselines", {})}  # type: ignore[dict-item]
    figures.update({k: v for k, v in summary["fact_tracing"].items()})  # type: ignore[union-attr]
    for method, values in methods.items():
        for key, value in values.items():
            if isinstance(value, dict):
                figures.update({f"{method}/{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float, str))})
            elif isinstance(value, (int, float, str, bool)):
                figures[f"{method}/{key}"] = value
        figures.update({f"{method}/{k}": v for k, v in values.get("fact_tracing", {}).items()})
    figures.update({f"seconds/{k}": v for k, v in summary["seconds"].items()})  # type: ignore[union-attr]
    return figures


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, object]
    topk: pa.Table
    queries: Path


def _solver_summary(ctx: Context, solver: str) -> dict[str, object]:
    """Status counts of a solve and, for iterative solvers, the mean objective h at the first and last iteration."""
    out_dir = ctx.paths.ihvp(solver)
    meta = read_meta(out_dir, "solved directions", "solve")
    summary: dict[str, object] = {"damping": float(meta["damping"]), "status": meta["status"]}
    if (out_dir / "trace.parquet").is_file():
        trace = pq.read_table(out_dir / "trace.parquet", columns=["query_id", "iteration", "objective"]).to_pydict()
        first: dict[str, tuple[int, float]] = {}
        last: dict[str, tuple[int, float]] = {}
        for q, k, h in zip(trace["query_id"], trace["iteration"], trace["objective"]):
            if q not in first or k < first[q][0]:
                first[q] = (k, h)
            if q not in last or k >= last[q][0]:
                last[q] = (k, h)
        if first:
            summary["objective_first_mean"] = sum(h for _, h in first.values()) / len(first)
            summary["objective_last_mean"] = sum(h for _, h in last.values()) / len(last)
    if (out_dir / "heldout.parquet").is_file():
        summary.update(heldout_summary(pq.read_table(out_dir / "heldout.parquet"), meta.get("heldout", {})))
    return summary


def run(cfg: Config, job: str = "run") -> RunResult:
    """All stages in order, then each `solver.baselines` entry's solve and score; writes summary.json (per-stage
    seconds, fact-tracing recall and the solve's objective per solver) and report.html."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ctx = open_context(cfg, job)
    timings["prepare"] = time.perf_counter() - start
    ctx.tracker.log({"prepare/seconds": timings["prepare"],
                     "prepare/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    queries = load_queries(ctx.queries)
    baselines: dict[str, dict[str, object]] = {}
    try:
        for name, stage in (("fit", fit), ("query", query), ("solve", solve), ("score", score)):
            t0 = time.perf_counter()
            reused, result = _reused(ctx, name)
            if not reused:
                result = stage(ctx)
            timings[name] = time.perf_counter() - t0
            _log_stage_result(ctx, name, result, timings[name])
        for solver in dict.fromkeys(b for b in cfg.solver.baselines if b != cfg.solver.name):
            other = replace(
                ctx,
                cfg=cfg.model_copy(update={"solver": cfg.solver.model_copy(update={"name": solver})}),
                paths=replace(ctx.paths, baseline=solver),
            )
            t0 = time.perf_counter()
            solve(other)
            t1 = time.perf_counter()
            table = score(other)
            seconds = {"solve": t1 - t0, "score": time.perf_counter() - t1}
            baselines[solver] = {
                **_solver_summary(ctx, solver), "fact_tracing": fact_recall(table, queries), "seconds": seconds
            }
            _log_stage_result(other, "score", table, seconds["score"])
        recall = fact_recall(result, queries)
        solve_summary = _solver_summary(ctx, cfg.solver.name)
        summary = {
            "solver": cfg.solver.name,
            **solve_summary,
            "seconds": {**timings, "total": time.perf_counter() - start},
            "fact_tracing": recall,
            "num_queries": int(len(set(result.column("query_id").to_pylist()))),
            "baselines": baselines,
        }
        write_json(ctx.paths.summary, summary)
        report(ctx)
        ctx.tracker.artifact(f"{ctx.paths.root.name}-results", "results", [ctx.paths.summary, ctx.paths.report])
        ctx.tracker.summary(_wandb_summary(summary))
    finally:
        ctx.tracker.close()
        if ctx.distributed:
            distributed_stages().close_session()
    return RunResult(summary, result, ctx.queries)
