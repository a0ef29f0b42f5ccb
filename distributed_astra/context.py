"""The run context every stage reads: the config, the run directory, the model, tokenizer and tracked modules, the
tracker, and the artifacts stages share (their metadata, the query gradients, the solved directions, the top-k).

It sits below every stage module (stages/, index/stages.py, report/build.py, pipeline.py) and imports none of
them. It opens the run's executor (execution.py): in process, or a Ray worker group for a distributed config.

Run directory layout (docs/design.md, "Artifacts"):
    data/corpus.parquet, data/queries.parquet   the demo corpus (data.corpus / data.queries = demo)
    model/                                      the demo's tokenizer and tiny GPT-2 (model.source = tiny)
    config.yaml                                 the resolved config of the last command (`--config` reads it back)
    factors/                                    EK-FAC factors (safetensors) + meta.json
    queries/                                    query gradients + meta.json (query ids as given)
    trajectory/                                 the tiny GPT-2's training trajectory (SOURCE, source/trajectory.py)
    source/segment_<ℓ>/                         SOURCE's segment-averaged EK-FAC factors (stages/source.py)
    ihvp/<solver>/                              solved directions (G + λI)⁻¹∇f + meta.json (+ trace.parquet);
                                                source | astra-source: directions_segment<ℓ>.safetensors
    topk.parquet, scores/                       solver.name's top-k (scores/: shard manifest, dense scores)
    baselines/<solver>/                         the same for each solver.baselines entry
    summary.json, report.html, metrics.jsonl, wandb/
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
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
    load_module_tensors,
    read_directions,
    read_meta,
    save_tensors,
    write_json,
)
from distributed_astra.config import Config, config_yaml
from distributed_astra.curvature.covariance import STAT_DTYPES
from distributed_astra.curvature.factors import model_fingerprint, stored_mean_lambda
from distributed_astra.data.corpus import Corpus, CorpusStats, corpus_files, open_corpus
from distributed_astra.data.demo_corpus import build_demo_corpus
from distributed_astra.data.sequences import (
    QueryId,
    SequenceFormat,
    encode_query,
    iter_training_batches,
    load_queries,
    shuffled_epochs,
)
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.distributed import is_distributed, validate_distributed
from distributed_astra.distributed.memory import rank_memory
from distributed_astra.errors import DastraError
from distributed_astra.execution import Executor, InProcessExecutor
from distributed_astra.ihvp.ekfac import DAMPING_SCALE
from distributed_astra.models.load import check_context_length, context_length, load_causal_lm, load_tokenizer
from distributed_astra.models.modules import TrackedModule, select_tracked_modules
from distributed_astra.models.tiny import build_tiny_gpt2, tiny_optimizer_settings, train_tiny_gpt2
from distributed_astra.progress import console, progress_bar
from distributed_astra.source.trajectory import TrajectoryRecorder, save_trajectory
from distributed_astra.tracking import SolveLogger, Tracker, train_logger


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
    executor: Executor  # where the stages' rank functions run (execution.py): in process, or a Ray worker group
    memo: dict[str, object] = field(default_factory=dict)  # per command: the corpus fingerprint, notes printed
    closers: list[Callable[[], None]] = field(default_factory=list)  # what `close` releases, last opened first

    def own(self, close: Callable[[], None]) -> None:
        """Close `close` with this context (once), so `with open_context(...)` releases everything in one place."""
        if close not in self.closers:
            self.closers.append(close)

    def close(self) -> None:
        """Release what the stages opened (last opened first), then flush and close the tracker."""
        try:
            while self.closers:
                self.closers.pop()()
        finally:
            self.tracker.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        note_skipped_rows(self, stats.skipped_empty, stats.skipped_non_utf8)

    def versions(self) -> dict[str, str]:
        return {
            "distributed_astra": distributed_astra.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        }

    def model_meta(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "tracked_modules": list(self.tracked)}


def model_source(cfg: Config, paths: RunPaths) -> str:
    """Where every worker loads the model from (the run's model folder or model.path; a hub id from the cache)."""
    if cfg.model.source == "tiny":
        return str(paths.model.resolve())
    return str(Path(cfg.model.path).resolve()) if cfg.model.source == "path" else str(cfg.model.hub_id)


def open_executor(
    cfg: Config, paths: RunPaths, model: nn.Module, tracked: dict[str, TrackedModule],
    tokenizer: PreTrainedTokenizerBase, fingerprint: str,
) -> Executor:
    """The run's executor: in process (one rank, this process's model), or a Ray worker group when the config is
    distributed (`is_distributed`); the group starts on the first stage that uses it."""
    if not is_distributed(cfg):
        return InProcessExecutor(model, tracked, tokenizer)
    from distributed_astra.distributed.executor import (
        RayExecutor,  # deferred: Ray and DeepSpeed, for distributed runs only
    )

    return RayExecutor(model_source(cfg, paths), fingerprint)


def log_rank_memory(ctx: Context, scope: str) -> None:
    """`<scope>/ranks_peak_rss_mb` (max over ranks of each worker's lifetime peak) and, on GPUs,
    `<scope>/ranks_cuda_max_allocated_mb` (max over ranks, this stage only): on a worker group the work runs on the
    ranks, which the driver's own `<scope>/peak_rss_mb` (tracking.StageMeter) does not see."""
    memory = ctx.executor.map(rank_memory, cfg=ctx.cfg, what="memory")
    metrics = {f"{scope}/ranks_peak_rss_mb": max(m["peak_rss_mb"] for m in memory)}
    if all("cuda_max_allocated_mb" in m for m in memory):
        metrics[f"{scope}/ranks_cuda_max_allocated_mb"] = max(m["cuda_max_allocated_mb"] for m in memory)
    ctx.tracker.log(metrics)


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


def open_context(cfg: Config, job: str, executor: Executor | None = None) -> Context:
    """Resolve data and model (building the demo's corpus and tiny GPT-2 when absent), choose tracked modules, open
    the executor (`executor`, when given, is the caller's to close: one worker group serving several contexts)."""
    paths = RunPaths(Path(cfg.output.run_dir))
    ensure_writable_dir(paths.root)  # a read-only or unwritable run directory is refused before any work
    if is_distributed(cfg):
        validate_distributed(cfg)
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
    fingerprint = model_fingerprint(model, tracked)
    ctx = Context(cfg, paths, corpus, queries, model, tokenizer, tracked, fingerprint, tracker,
                  executor or open_executor(cfg, paths, model, tracked, tokenizer, fingerprint))
    if executor is None:
        ctx.own(ctx.executor.close)
    return ctx


def note_skipped_rows(ctx: Context, empty: int, non_utf8: int) -> None:
    """`warn_skipped_rows` once per command, for the first corpus pass (on any rank) that skipped rows."""
    if (empty or non_utf8) and not ctx.memo.get("skipped_reported"):
        ctx.memo["skipped_reported"] = True
        warn_skipped_rows(ctx.corpus, empty, non_utf8)


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
        ctx.memo["corpus_fingerprint"] = ctx.open_corpus().fingerprint
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
    """What the query gradients depend on: the model, the queries file (path and content), the statistics dtype and
    their storage (`solver.state_dtype`)."""
    if "queries_digest" not in ctx.memo:
        ctx.memo["queries_digest"] = _file_digest(ctx.queries)
    return {
        **ctx.model_meta(), "queries": str(ctx.queries), "queries_digest": ctx.memo["queries_digest"],
        "factors.dtype": ctx.cfg.factors.dtype, "solver.state_dtype": ctx.cfg.solver.state_dtype,
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


def run_damping(ctx: Context) -> float:
    """λ of the run: `solver.damping`, or for "auto" kronfluence's DAMPING_SCALE × the mean Λ the fit recorded
    (`ihvp.ekfac.default_damping` of the same factors, read without loading them)."""
    damping = ctx.cfg.solver.damping
    return DAMPING_SCALE * stored_mean_lambda(ctx.paths.factors) if damping == "auto" else float(damping)


QUERY_GRADIENTS_STEM = "gradients"  # queries/gradients-<rank>.safetensors: the modules that rank owns


def query_gradients_folder(ctx: Context) -> tuple[list[QueryId], Path]:
    """(query ids as the queries file gives them, the queries/ folder) of the query stage, its meta checked."""
    meta = read_meta(ctx.paths.queries, "query gradients", "query")
    check_meta(meta, query_meta(ctx), "query gradients", "query")
    return meta["query_ids"], ctx.paths.queries


def query_gradient_shards(folder: Path) -> dict[str, str]:
    """{module: shard file} of a queries/ folder (its meta.json's map)."""
    files = read_meta(folder, "query gradients", "query").get("files")
    if not isinstance(files, dict):
        raise DastraError(f"query gradients '{folder}' have no module → shard map: re-run `dastra query`")
    return files


def read_query_gradients(folder: Path, names: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """{module: [Q, out, in+1]} of `names` from a queries/ folder: only the shards holding them are opened (a
    rank reads the modules it owns)."""
    return load_module_tensors(folder, query_gradient_shards(folder), names, "query gradients", "query",
                               device=device)


def load_query_gradients(ctx: Context) -> tuple[list[QueryId], dict[str, torch.Tensor]]:
    """(query ids as the queries file gives them, {module: [Q, out, in+1]} of every tracked module) of the query
    stage."""
    ids, folder = query_gradients_folder(ctx)
    return ids, read_query_gradients(folder, list(ctx.tracked))


def load_directions(ctx: Context, solver: str | None = None) -> tuple[list[QueryId], dict[str, torch.Tensor]]:
    """(query ids, {module: [Q, out, in+1]}) of the directions solved by `solver` (default `solver.name`)."""
    return read_directions(ctx.paths.ihvp(solver or ctx.cfg.solver.name), ctx.model_meta())


def solver_logger(ctx: Context, name: str | None = None) -> SolveLogger:
    """The W&B layout of one method's solve (`solver.name` by default; tracking.SolveLogger): per iteration, the
    aggregates over each chunk's running queries against ONE `solve/<name>/iteration` axis counting across chunks
    (`chunk(query_ids)` gives a chunk's callbacks); the per-query trace once, as a table and one chart (`finish`)."""
    return SolveLogger(ctx.tracker, name or ctx.cfg.solver.name)





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


def write_directions(
    ctx: Context, query_ids: list[QueryId], directions: dict[str, torch.Tensor], statuses: list[str], damping: float,
    trace: pa.Table | None, heldout: pa.Table | None, heldout_info: dict[str, object] | None,
) -> None:
    """`ihvp/<solver.name>/`, the one writer of solved directions (read by `load_directions`): the directions, the
    convergence trace and held-out evaluation of iterative solvers, and meta.json (settings, damping, statuses,
    query ids as given), atomically. SOURCE's per-segment directions are written by stages/source.py."""
    with atomic_path(ctx.paths.ihvp(ctx.cfg.solver.name)) as tmp:
        tmp.mkdir()
        save_tensors(directions, tmp / DIRECTIONS_FILE)
        if trace is not None:
            pq.write_table(trace, tmp / "trace.parquet")
        if heldout is not None:
            pq.write_table(heldout, tmp / "heldout.parquet")
        write_json(
            tmp / "meta.json",
            {
                **directions_meta(ctx),
                "solver": ctx.cfg.solver.model_dump(mode="json"),
                "damping": damping,
                "status": {s: statuses.count(s) for s in sorted(set(statuses))},
                "query_ids": query_ids,
                **({"heldout": heldout_info} if heldout_info else {}),
            },
        )


def topk_table(ctx: Context, query_ids: list[QueryId], scores: torch.Tensor, keys: torch.Tensor) -> pa.Table:
    """topk.parquet's table (query_id, rank, doc_id, score, text) from [Q, k] scores and document keys, with the
    ids as the queries file and the corpus give them; written atomically."""
    corpus = ctx.open_corpus()
    flat = keys.flatten().tolist()
    texts, doc_ids = corpus.texts_and_ids(flat)
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


