"""GPU check: the package's GPU path end to end on one device, in one command (at most 8 minutes on one H100/H200).

    .venv/bin/python benchmarks/gpu_check.py                    # cuda: GPT-2 XL shape, bf16, NCCL
    .venv/bin/python benchmarks/gpu_check.py --device cpu       # a small shape on gloo (tests/test_gpu_check.py)

What runs, in order, each through the package's own functions:

1. A 1-rank process group (nccl on cuda, gloo on cpu; tcp://127.0.0.1:<free port>, world size 1). The package's
   collectives (`all_reduce_sum`, `all_reduce_counts`) are the identity at world size 1, so one
   `torch.distributed.all_reduce` of a device tensor also proves that the backend takes device tensors, and
   `collective_device()` must name the device.
2. A random-init GPT-2 (cuda: GPT-2 XL's shape, n_layer 48, n_embd 1600, n_head 25, vocab 50257, in bfloat16;
   cpu: n_layer 4, n_embd 64, vocab 512, float32, one torch thread), eager attention, prepared for attribution.
   Tracked: the c_fc of every other block (`transformer.h.*[02468].mlp.c_fc`: 24 modules of [6400, 1601] on GPT-2
   XL, D = 246M; configs/gpt2xl.yaml tracks these and the same blocks' c_proj).
   Sequences of 512 tokens on cuda (32 on cpu); fit batches of 8, ASTRA minibatches of 8 (4), scoring batches of 8.
3. The EK-FAC fit on a small slice through the fit stage's rank function `stages.fit.rank_fit` on a
   `execution.Rank(0, 1, ...)`: a Parquet corpus of random words and a byte-level BPE tokenizer trained on it
   (vocabulary 1024, at most the model's), statistics in `factors.dtype` (float32 by default, as configs/gpt2xl.yaml).
4. 20 ASTRA iterations (`ihvp.solvers.solve`, the exact `GGNProduct` or `--product fisher`, `ekfac_preconditioner`)
   for the gradients of random sequences, factors and vectors on the device; seconds per iteration from the
   solver's per-iteration callback. Learning rate `relative` (α = lr·λ, `--lr` 1 as configs/gpt2xl.yaml; or
   `--lr-mode`), damping 0.1·mean(Λ), patience above the iteration count so that all 20 iterations run. A query
   that diverges (ASTRA falls back to the EK-FAC solution) fails the check.
5. Scoring throughput: `scoring.gradients.captured_batches` + `scoring.inner_products.sequence_scores` with Q = 1
   and Q = 16 random directions against a plain forward + `loss.backward()` of the same batches and the same
   (frozen, attribution-prepared) model, so the ratio is the cost of the capture and the inner products; each
   figure is the fastest of 3 passes after a warm-up batch.
6. faiss on the GPU when `faiss.get_num_gpus() > 0`: an IndexFlatIP search on the GPU against the CPU's answer.
7. Peak memory of the fit, the solve and scoring (Q = 16), predicted by the planner (`plan.make_plan` for this
   very shape and batch sizes, 1 GPU: the fit's stages' maximum, the ASTRA chunk, scoring) against measured: on
   cuda `torch.cuda.max_memory_allocated`; on cpu the bytes of the live tensors (the model, the phase's inputs,
   and the high-water mark of the storages the phase allocates, tallied by `plan.simulate.LiveBytes`, whose
   per-operation bookkeeping also slows the cpu fit and solve timings).

A check that fails (an exception in the package, a wrong answer) is recorded as `<check>_error` and in `failed`, and
the remaining checks still run. It prints one JSON line with every figure last and writes a Markdown table with the
command (default docs/results/gpu_check.md, atomically). Exit status 0 when every check passed, 1 when one failed,
2 on bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GPT2Config

from distributed_astra.artifacts import atomic_path
from distributed_astra.config import Config, load_config
from distributed_astra.curvature.covariance import STAT_DTYPES, product_dtype
from distributed_astra.curvature.factors import EkfacFactors, load_factor_shard, shard_file
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.distributed.collectives import all_reduce_counts, all_reduce_sum, collective_device
from distributed_astra.execution import Rank
from distributed_astra.ihvp.ekfac import default_damping
from distributed_astra.ihvp.products import FisherProduct, GGNProduct, label_generator
from distributed_astra.ihvp.solvers import MinibatchSampler, ekfac_preconditioner, solve
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.plan import make_plan
from distributed_astra.plan.estimate import GIB
from distributed_astra.plan.simulate import LiveBytes
from distributed_astra.scoring.gradients import captured_batches, example_gradients
from distributed_astra.scoring.inner_products import sequence_scores
from distributed_astra.stages.fit import rank_fit
from distributed_astra.task import CAUSAL_LM

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "gpu_check.md"
DEVICES = ("cuda", "cpu")
TRACKED = ["transformer.h.*[02468].mlp.c_fc"]
TOKENIZER_VOCAB = 1024
SCORING_QUERIES = (1, 16)
SCORING_REPEATS = 3  # each scoring figure is the fastest of this many passes over the same batches
FIT_STAGES = ("covariances", "eigendecomposition", "eigenvalue correction")


@dataclass(frozen=True)
class Shape:
    """The model and the work sizes of one check."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq_len: int
    dtype: str  # the model's (config `model.dtype`)
    fit_sequences: int
    fit_batch: int
    minibatch: int
    score_batch: int
    score_batches: int


SHAPES = {
    "cuda": Shape(48, 1600, 25, 50257, 512, "bfloat16", 64, 8, 8, 8, 8),  # GPT-2 XL
    "cpu": Shape(4, 64, 4, 512, 32, "float32", 32, 8, 4, 8, 4),
}


class CheckFailed(Exception):
    """A check gave a wrong answer (the message says which)."""


class PartialFailure(Exception):
    """A check raised after it had measured something: `figures` are reported with the error of its cause."""

    def __init__(self, figures: dict[str, object]) -> None:
        super().__init__("partial figures")
        self.figures = figures


# --------------------------------------------------------------------------------------------- timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall seconds of the block, device work included: {"seconds": s} once the block ends (or raises)."""
    out: dict[str, float] = {}
    synchronize(device)
    started = time.perf_counter()
    try:
        yield out
    finally:
        synchronize(device)
        out["seconds"] = time.perf_counter() - started


def tensor_bytes(*objects: object) -> int:
    """Bytes of the distinct storages of the tensors in `objects` (tensors, dicts/lists of them, modules)."""
    seen: dict[int, int] = {}

    def visit(x: object) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, torch.nn.Module):
            for t in [*x.parameters(), *x.buffers()]:
                visit(t)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif hasattr(x, "__dataclass_fields__"):
            for name in x.__dataclass_fields__:
                visit(getattr(x, name))

    for obj in objects:
        visit(obj)
    return sum(seen.values())


@contextlib.contextmanager
def peak_memory(device: torch.device, *resident: object) -> Iterator[dict[str, int]]:
    """The peak bytes of live tensors during the block: {"bytes": n} once it ends (or raises).

    cuda: `torch.cuda.max_memory_allocated` (everything allocated on the device, `resident` included). cpu: the bytes
    of `resident` (the model, the phase's inputs) plus the high-water mark of the storages the block allocates."""
    out: dict[str, int] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield out
        finally:
            torch.cuda.synchronize(device)
            out["bytes"] = int(torch.cuda.max_memory_allocated(device))
        return
    base = tensor_bytes(*resident)
    live = LiveBytes()
    try:
        with live:
            yield out
    finally:
        out["bytes"] = base + live.peak


# --------------------------------------------------------------------------------------------- set-up
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_process_group(device: torch.device) -> dict[str, object]:
    """A 1-rank group on the device's backend; one all-reduce through the package and one directly."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if collective_device().type != device.type:
        raise CheckFailed(f"collective_device() is {collective_device()} under {backend}, expected {device.type}")
    x = torch.arange(4, dtype=torch.float32, device=device)
    summed = all_reduce_sum({"x": x})["x"]
    counts = all_reduce_counts(3, 5)
    direct = x.clone()
    dist.all_reduce(direct)
    synchronize(device)
    if not (torch.equal(summed, x) and counts == [3, 5] and torch.equal(direct, x) and direct.device == x.device):
        raise CheckFailed(f"1-rank all_reduce on {backend} changed a device tensor: {direct.tolist()}")
    return {"backend": backend, "all_reduce": "ok", "collective_device": str(collective_device())}


def random_words(rng: random.Random, count: int) -> str:
    syllables = ["ka", "to", "ri", "mu", "sel", "van", "or", "pe", "lin", "dra", "qu", "est", "no", "bi", "zu"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(count))


def write_corpus(folder: Path, shape: Shape, seed: int) -> Path:
    """A Parquet corpus (`text`, `doc_id`) of random words: documents of 3 x seq_len words, which the fit splits into
    full sequences of seq_len tokens (and a shorter last one) until `factors.max_sequences`."""
    rng = random.Random(seed)
    texts = [random_words(rng, 3 * shape.seq_len) for _ in range(shape.fit_sequences)]
    path = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": texts, "doc_id": list(range(len(texts)))}), path)
    return path


def check_config(shape: Shape, device: torch.device, folder: Path, corpus: Path, args: argparse.Namespace) -> Config:
    """The run's config: this shape through `plan.hf_config`, the fit slice, ASTRA's settings, one rank, 1 GPU."""
    hf = folder / "config.json"
    gpt2_config(shape).to_json_file(hf)
    overrides = [
        "model.source=path", f"model.path={folder}", f"model.dtype={shape.dtype}", f"model.tracked_modules={TRACKED}",
        f"data.corpus={corpus}", "data.queries=demo", f"data.max_length={shape.seq_len}",
        f"factors.dtype={args.stat_dtype}", f"factors.batch_size={shape.fit_batch}",
        f"factors.max_sequences={shape.fit_sequences}",
        "solver.name=astra", "solver.baselines=[]", f"solver.product={args.product}", f"solver.lr_mode={args.lr_mode}",
        f"solver.lr={args.lr}", f"solver.iterations={args.iterations}", f"solver.patience={args.iterations + 1}",
        "solver.tolerance=0", "solver.heldout_every=0", f"solver.minibatch_size={shape.minibatch}",
        f"solver.query_batch_size={args.queries}", f"scoring.batch_size={shape.score_batch}",
        f"ray.use_gpu={'true' if device.type == 'cuda' else 'false'}", "ray.num_workers=1", "deepspeed.stage=0",
        f"plan.hf_config={hf}", "plan.gpus=1", f"plan.gpu_memory={args.gpu_memory}", "plan.memory_reserve=0",
        f"plan.documents={shape.fit_sequences}",
    ]
    return load_config(None, overrides)


def gpt2_config(shape: Shape) -> GPT2Config:
    return GPT2Config(
        n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head, vocab_size=shape.vocab_size,
        n_positions=max(1024, shape.seq_len), bos_token_id=0, eos_token_id=0,
    )


def build_model(shape: Shape, device: torch.device) -> torch.nn.Module:
    """A random-init GPT-2 of `shape`, built on the device in its dtype, eager attention, prepared for attribution."""
    dtype = getattr(torch, shape.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(gpt2_config(shape), dtype=dtype, attn_implementation="eager")
    return prepare_for_attribution(model)


def random_batches(shape: Shape, count: int, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` CPU batches of `rows` full sequences of random tokens, every token labelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(1, shape.vocab_size, (rows, shape.seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                    "doc_id": torch.arange(i * rows, (i + 1) * rows)})
    return out


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- the checks
def check_fit(rank: Rank, corpus: Path, device: torch.device) -> tuple[object, dict[str, float]]:
    """`rank_fit` on the corpus slice, its shard written to a scratch folder and read back: the factors (on the
    device) and the fit's figures."""
    with tempfile.TemporaryDirectory() as folder:
        with peak_memory(device, rank.model) as peak, timed(device) as clock:
            out = rank_fit(rank, str(corpus), folder)
        if out["counts"] is None:
            raise CheckFailed("the fit saw no sequence")
        num_tokens, num_sequences, num_lambda = out["counts"]
        factors = EkfacFactors(
            {n: mf.to(device) for n, mf in load_factor_shard(Path(folder) / shard_file(rank.rank)).items()},
            num_tokens, num_sequences, num_lambda,
        )
    for name in factors.names:
        if not bool(torch.isfinite(factors[name].lambda_).all()):
            raise CheckFailed(f"non-finite Λ for {name}")
    return factors, {
        "fit_seconds": clock["seconds"], "fit_sequences": factors.num_sequences, "fit_tokens": factors.num_tokens,
        "fit_peak_bytes": peak["bytes"],
    }


def check_solve(
    cfg: Config, model: torch.nn.Module, tracked: dict, factors: object, shape: Shape, device: torch.device,
) -> dict[str, float]:
    """ASTRA for the gradients of `solver.query_batch_size` random sequences: seconds per iteration, peak memory."""
    compute = product_dtype(model, STAT_DTYPES[cfg.factors.dtype])
    queries = [on_device(b, device) for b in random_batches(shape, 1, cfg.solver.query_batch_size, seed=1)]
    v = example_gradients(model, tracked, queries, compute)
    damping = default_damping(factors)
    precondition = ekfac_preconditioner(factors, cfg.solver, damping, cfg.factors.strategy)
    if cfg.solver.product == "ggn":
        product = GGNProduct(model, tracked)
    else:
        product = FisherProduct(model, tracked, cfg.solver.fisher_samples, label_generator(model, cfg.solver.seed))
    pool = random_batches(shape, 2, 2 * shape.minibatch, seed=2)
    sampler = MinibatchSampler(pool, shape.minibatch, torch.Generator().manual_seed(cfg.solver.seed))
    stamps: list[float] = []  # one per iteration, when the solver's monitor has its h and residual on the host

    def measured() -> dict[str, float]:
        out = {"solve_damping": damping, "solve_seconds": clock["seconds"], "solve_peak_bytes": peak["bytes"],
               "solve_iterations_timed": len(stamps)}
        if len(stamps) >= 2:
            out["solve_seconds_per_iteration"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        return out

    try:
        with peak_memory(device, model, factors, v) as peak, timed(device) as clock:
            result = solve(v, precondition, product, sampler, cfg.solver, damping,
                           on_iteration=lambda *_: stamps.append(time.perf_counter()))
    except Exception as exc:
        raise PartialFailure(measured()) from exc  # what ran before the error is still a measurement
    ran = max(result.iterations)
    if len(stamps) < 2 or ran < 2:
        raise CheckFailed(f"ASTRA ran {ran} iteration(s), expected {cfg.solver.iterations}")
    if not all(bool(torch.isfinite(t).all()) for t in result.x.values()):
        raise CheckFailed("ASTRA's directions are not finite")
    figures = {**measured(), "solve_iterations": ran, "solve_fell_back": int(result.fell_back.sum())}
    if result.fell_back.any():
        diverged = CheckFailed(
            f"ASTRA diverged for {figures['solve_fell_back']} of {len(result.fell_back)} queries by iteration {ran} "
            f"(fell back to the EK-FAC solution) at --lr {cfg.solver.lr} --lr-mode {cfg.solver.lr_mode} (damping "
            f"{damping:.3g}); try a lower --lr or --lr-mode auto")
        raise PartialFailure(figures) from diverged
    return figures


def fastest(device: torch.device, work, repeats: int = SCORING_REPEATS) -> float:
    """The fastest of `repeats` timed runs of `work()`, in seconds."""
    best = math.inf
    for _ in range(repeats):
        with timed(device) as clock:
            work()
        best = min(best, clock["seconds"])
    return best


def plain_pass(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Forward and `loss.backward()` of the summed token loss, batch by batch."""
    for batch in batches:
        with torch.enable_grad():
            CAUSAL_LM.loss(CAUSAL_LM.output(model, batch), batch).sum().backward()


def scoring_pass(model, tracked, batches, directions, compute) -> None:
    """The scoring stage's inner loop: capture, then the [B, Q] scores, brought to the host."""
    for _batch, capture in captured_batches(model, tracked, batches, compute):
        sequence_scores(capture.output_grads, capture.activations, directions).cpu()


def check_scoring(
    cfg: Config, model: torch.nn.Module, tracked: dict, shape: Shape, device: torch.device,
) -> dict[str, float]:
    """Sequences per second of plain forward+backward and of scoring with Q = 1 and 16 on the same batches."""
    compute = product_dtype(model, STAT_DTYPES[cfg.factors.dtype])
    batches = [on_device(b, device) for b in random_batches(shape, shape.score_batches, shape.score_batch, seed=3)]
    g = torch.Generator(device=device).manual_seed(4)
    sequences = shape.score_batches * shape.score_batch
    out: dict[str, float] = {"score_sequences": sequences}
    plain_pass(model, batches[:1])  # warm-up: kernels, cuBLAS handles, the allocator's pools
    out["score_plain_sequences_per_s"] = sequences / fastest(device, lambda: plain_pass(model, batches))
    for q in SCORING_QUERIES:  # the directions of one Q at a time (the last ones stay for the memory figure)
        directions = None  # the previous Q's are freed before these are drawn
        directions = {n: torch.randn(q, *t.shape, generator=g, device=device, dtype=compute)
                      for n, t in tracked.items()}
        scoring_pass(model, tracked, batches[:1], directions, compute)  # warm-up: this Q's contraction order
        seconds = fastest(device, lambda w=directions: scoring_pass(model, tracked, batches, w, compute))
        out[f"score_q{q}_sequences_per_s"] = sequences / seconds
        out[f"score_q{q}_time_over_plain"] = out["score_plain_sequences_per_s"] / out[f"score_q{q}_sequences_per_s"]
    with peak_memory(device, model, directions) as peak:  # one untimed batch (cpu's tally slows every op)
        scoring_pass(model, tracked, batches[:1], directions, compute)
    out["score_peak_bytes"] = peak["bytes"]
    return out


def check_faiss() -> dict[str, object]:
    """An IndexFlatIP search on the GPU against the CPU's, when faiss sees a GPU."""
    try:
        import faiss
    except ImportError:
        return {"faiss": "skipped: faiss not installed"}
    if getattr(faiss, "get_num_gpus", lambda: 0)() <= 0:
        return {"faiss": "skipped: no faiss GPU"}
    rng = np.random.default_rng(0)
    base = rng.standard_normal((100_000, 256), dtype=np.float32)
    queries = rng.standard_normal((256, 256), dtype=np.float32)
    cpu = faiss.IndexFlatIP(256)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    started = time.perf_counter()
    d_cpu, i_cpu = cpu.search(queries, 10)
    cpu_seconds = time.perf_counter() - started
    gpu.search(queries, 10)  # warm-up
    started = time.perf_counter()
    d_gpu, i_gpu = gpu.search(queries, 10)
    gpu_seconds = time.perf_counter() - started
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_cpu, i_gpu)]))
    if recall < 0.99 or not np.allclose(d_cpu, d_gpu, rtol=1e-3, atol=1e-3):
        raise CheckFailed(f"faiss GPU search disagrees with the CPU's (recall@10 {recall:.3f})")
    return {"faiss": "ok", "faiss_recall_at_10": recall, "faiss_cpu_seconds": cpu_seconds,
            "faiss_gpu_seconds": gpu_seconds}


def predicted_memory(cfg: Config) -> dict[str, int]:
    """The planner's per-GPU bytes for the fit (its stages' maximum), the ASTRA chunk, and scoring with 16 queries."""
    plan = make_plan(cfg, search=False)
    by_stage = {s.stage: s.per_gpu for s in plan.stages}
    solve_stage = next(s for s in by_stage if s.startswith("astra chunk"))
    scoring_cfg = cfg.model_copy(update={"solver": cfg.solver.model_copy(
        update={"query_batch_size": SCORING_QUERIES[-1]})})
    scoring = {s.stage: s.per_gpu for s in make_plan(scoring_cfg, search=False).stages}["scoring"]
    return {"fit_predicted_bytes": max(by_stage[s] for s in FIT_STAGES), "solve_predicted_bytes": by_stage[solve_stage],
            "score_predicted_bytes": scoring}


# --------------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s))"


def size(nbytes: int | None) -> str:
    """Bytes in GiB from 1 GiB on, else MiB; "-" for a figure the run has not got."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def markdown(figures: dict[str, object], command: str) -> str:
    """The report: the checks' results (a failed check shows its error), the memory table, the command."""
    def result(name: str, text) -> str:
        error = figures.get(f"{name}_error")
        return f"FAILED: {error}" if error else text()

    def solve_timing() -> str:
        per_iteration = figures["solve_seconds_per_iteration"]
        return f"{figures['solve_iterations_timed']} iterations at {per_iteration:.3f} s/iteration"

    solve_row = result("solve", lambda: (
        f"{solve_timing()} ({figures['product']} product, {figures['queries']} query, minibatch "
        f"{figures['minibatch']} x {figures['seq_len']} tokens)"))
    if "solve_error" in figures and "solve_seconds_per_iteration" in figures:
        solve_row += f"; before the error: {solve_timing()}"

    rows = [
        ("device", figures["device_name"]),
        ("process group", result("process_group", lambda: (
            f"{figures['backend']}, world size 1, all_reduce of a {figures['collective_device']} tensor "
            f"{figures['all_reduce']}"))),
        ("model", (f"GPT-2 n_layer {figures['n_layer']}, n_embd {figures['n_embd']}, vocab {figures['vocab_size']}, "
                   f"{figures['model_dtype']}, {figures['num_parameters']:,} parameters, random init")),
        ("tracked", (f"{figures['tracked_modules']} module(s) `{', '.join(TRACKED)}`, "
                     f"D = {figures['tracked_parameters']:,}")),
        ("fit (rank_fit)", result("fit", lambda: f"{figures['fit_sequences']} sequences, {figures['fit_tokens']} "
                                                 f"tokens, {figures['fit_seconds']:.2f} s, statistics "
                                                 f"{figures['stat_dtype']}")),
        ("ASTRA", solve_row),
        ("scoring, plain fwd+bwd", result("score", lambda: f"{figures['score_plain_sequences_per_s']:.2f} seq/s")),
        *((f"scoring, Q = {q}", result("score", lambda q=q: f"{figures[f'score_q{q}_sequences_per_s']:.2f} seq/s, "
                                                            f"{figures[f'score_q{q}_time_over_plain']:.2f}x the plain "
                                                            "time"))
          for q in SCORING_QUERIES),
        ("faiss", result("faiss", lambda: figures["faiss"] + (
            f" (recall@10 {figures['faiss_recall_at_10']:.3f}, GPU {figures['faiss_gpu_seconds']:.4f} s vs CPU "
            f"{figures['faiss_cpu_seconds']:.4f} s)" if figures["faiss"] == "ok" else ""))),
    ]
    memory = [
        (phase, size(figures.get(f"{key}_predicted_bytes")), size(figures.get(f"{key}_peak_bytes")),
         f"{figures[f'{key}_predicted_over_measured']:.3f}" if f"{key}_predicted_over_measured" in figures else "-")
        for phase, key in (("fit", "fit"), ("ASTRA solve", "solve"), (f"scoring, Q = {SCORING_QUERIES[-1]}", "score"))
    ]
    measured = ("`torch.cuda.max_memory_allocated`" if figures["device"] == "cuda"
                else "live tensor bytes: the model, the inputs and `LiveBytes`' high-water mark")
    lines = [
        "# GPU check", "",
        "One run of `benchmarks/gpu_check.py` (what it checks and how: its docstring). Command:", "",
        f"    {command}", "",
        "| check | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "",
        f"Peak memory, predicted by the planner (`plan.make_plan`, 1 GPU) against measured ({measured}):", "",
        "| phase | predicted | measured | predicted / measured |", "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in memory), "",
        f"Total {figures['total_seconds']:.1f} s; torch {torch.__version__}; "
        + (f"failed: {', '.join(figures['failed'])}." if figures.get("failed") else "every check passed."), "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def attempt(figures: dict[str, object], name: str, check, *args):
    """`check(*args)`, its figures merged into `figures`; an exception is recorded as `<name>_error` (one line) and
    the next checks still run. Returns the check's result, None when it failed."""
    try:
        result = check(*args)
    except Exception as exc:  # noqa: BLE001  (a failing check is a result: reported, and the exit status says so)
        if isinstance(exc, PartialFailure):
            figures.update(exc.figures)
            exc = exc.__cause__
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f for f in reversed(frames) if "distributed_astra" in f.filename), frames[-1])
        message = str(exc).splitlines()[0] if str(exc) else ""
        figures[f"{name}_error"] = f"{type(exc).__name__}: {message} ({Path(where.filename).name}:{where.lineno})"
        figures.setdefault("failed", []).append(name)
        return None
    if isinstance(result, tuple):
        figures.update(result[1])
        return result[0]
    figures.update(result)
    return result


def describe(shape: Shape, args: argparse.Namespace, model: torch.nn.Module, tracked: dict) -> dict[str, object]:
    return {
        "n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab_size": shape.vocab_size, "seq_len": shape.seq_len,
        "model_dtype": shape.dtype, "stat_dtype": args.stat_dtype,
        "num_parameters": sum(p.numel() for p in model.parameters()), "tracked_modules": len(tracked),
        "tracked_parameters": sum(t.shape[0] * t.shape[1] for t in tracked.values()),
        "product": args.product, "queries": args.queries, "minibatch": shape.minibatch,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Every check in order; a failing check is recorded (`<name>_error`, `failed`) and the others still run."""
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    shape = SHAPES[args.device]
    started = time.perf_counter()
    figures: dict[str, object] = {"device": args.device}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # the small shape: one thread is faster than contended BLAS threads
    figures["device_name"] = device_name(device)
    attempt(figures, "process_group", check_process_group, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        folder = Path(scratch)
        corpus = write_corpus(folder, shape, seed=0)
        texts = pq.read_table(corpus).column("text").to_pylist()
        tokenizer = train_bpe_tokenizer(texts, min(TOKENIZER_VOCAB, shape.vocab_size), folder / "tokenizer")
        cfg = check_config(shape, device, folder, corpus, args)
        model = build_model(shape, device)
        tracked = select_tracked_modules(model, TRACKED)
        figures.update(describe(shape, args, model, tracked))
        attempt(figures, "plan", predicted_memory, cfg)
        factors = attempt(figures, "fit", check_fit, Rank(0, 1, cfg, model, tracked, tokenizer), corpus, device)
        if factors is not None:
            attempt(figures, "solve", check_solve, cfg, model, tracked, factors, shape, device)
        del factors
        attempt(figures, "score", check_scoring, cfg, model, tracked, shape, device)
    if dist.is_initialized():
        dist.destroy_process_group()
    attempt(figures, "faiss", check_faiss)
    for key in ("fit", "solve", "score"):
        if f"{key}_predicted_bytes" in figures and f"{key}_peak_bytes" in figures:
            figures[f"{key}_predicted_over_measured"] = figures[f"{key}_predicted_bytes"] / figures[f"{key}_peak_bytes"]
    figures["total_seconds"] = time.perf_counter() - started
    return figures


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (GPT-2 XL shape) or cpu (a small shape)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown report")
    parser.add_argument("--product", default="ggn", help="the ASTRA curvature product: ggn or fisher")
    parser.add_argument("--stat-dtype", default="float32", help="factors.dtype: float32 or float64")
    parser.add_argument("--iterations", type=int, default=20, help="ASTRA iterations")
    parser.add_argument("--queries", type=int, default=1, help="queries solved together")
    parser.add_argument("--lr", type=float, default=1.0, help="solver.lr (under relative: alpha = lr x lambda)")
    parser.add_argument("--lr-mode", default="relative", help="solver.lr_mode: relative, absolute or auto")
    parser.add_argument("--gpu-memory", default=None, help="planner budget per GPU (default: this device's)")
    args = parser.parse_args(argv)
    for name, value, allowed in (("--device", args.device, DEVICES), ("--product", args.product, ("ggn", "fisher")),
                                 ("--stat-dtype", args.stat_dtype, tuple(STAT_DTYPES)),
                                 ("--lr-mode", args.lr_mode, ("relative", "absolute", "auto"))):
        if value not in allowed:
            raise CheckFailed(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
    if args.iterations < 2 or args.queries < 1 or not args.lr > 0:
        raise CheckFailed("--iterations must be at least 2, --queries at least 1 and --lr above 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    if args.gpu_memory is None:
        total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 64 * GIB
        args.gpu_memory = f"{total / GIB:.3f}GiB"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except CheckFailed as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    figures = run(args)
    command = " ".join([".venv/bin/python", "benchmarks/gpu_check.py", *argv])
    write_markdown(args.out, markdown(figures, command))
    for name in figures.get("failed", []):
        print(f"gpu_check: {name} failed: {figures[f'{name}_error']}", file=sys.stderr)
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in figures.items()}))
    return 1 if figures.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
