"""Scoring: throughput against a plain forward+backward, and the fidelity of low-rank / bfloat16 directions
(`scoring.direction_rank`, `scoring.direction_dtype`). Writes docs/results/scoring.md, one section per mode (the
other section of the page is kept), and prints one final JSON line.

    python benchmarks/bench_scoring.py                      # "Throughput": ≈ 4-5 min on the shared 2-core machine
    python benchmarks/bench_scoring.py --fidelity           # "Low-rank fidelity": ≈ 15 min (+ ≈ 10 min the first
                                                            #   time, to build the two runs it re-scores)
    python benchmarks/bench_scoring.py --quick              # smoke run of the throughput section, page in /tmp
    python benchmarks/bench_scoring.py --fidelity --quick   # smoke run of the fidelity section, page in /tmp

Throughput (one run, repeats interleaved round-robin with a rotating order so that machine noise hits every
contender alike; medians): the demo-sized tiny GPT-2 of bench_fit_score (vocab 4096, 2 layers, n_embd 128,
4 heads, 64 tokens, random init, float32), 8 tracked modules, uniform random 64-token sequences, for Q = 1, 16, 100
queries with random directions of the right shapes (the time does not depend on their values):

  fwd_bwd            forward + ordinary loss.backward() of the summed loss, parameters requiring grad (weight
                     gradients allocated), as bench_fit_score's fwd_bwd
  full/float32       the score stage's per-batch work: captured_batches (forward, autograd.grad to the tracked
                     outputs) + stages.score.step_scores (module_scores of every module) + the top-k, directions
                     held as scoring.low_rank.stored_direction makes them with scoring.direction_rank: null
  full/bfloat16      the same, directions stored in bfloat16 (scoring.direction_dtype: bfloat16)
  r<k>/<dtype>       scoring.direction_rank: k (LowRank factors), stored in float32 or bfloat16

Products run in `product_dtype(model, float64 factors)` = float32 for a float32 model, the dtype the score stage
uses (and the GPU default). The direction bytes held are the stage's own count (`LowRank.nbytes`, tensor bytes).

Low-rank fidelity: two runs of the demo pipeline (`dastra demo`: tiny GPT-2 trained on stdlib docs with planted
facts, ASTRA directions; the demo model and a second model, --second, by default the demo with model.tiny.seed=1
and n_embd 192), built once under --fidelity-dir and reused. Their SAME solved ASTRA directions are re-scored by
the score stage (`pipeline.score`, resumable, each variant into baselines/bench-scoring-<variant>/ of the run, so
the run's own topk.parquet is untouched) for every scoring.direction_rank in {1, 2, 4, 8, 16, 32, 64, null} x
scoring.direction_dtype in {float32, bfloat16}; against full-rank float32: the mean top-10 overlap per query
(|top10 ∩ top10_full| / 10) and the fact-tracing recall@1 / recall@10 / MRR of the planted documents.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from bench_fit_score import cpu_name  # noqa: E402  (this script's folder is on sys.path)

from distributed_astra.artifacts import atomic_path  # noqa: E402
from distributed_astra.config import ScoringConfig, load_config  # noqa: E402
from distributed_astra.curvature.covariance import product_dtype  # noqa: E402
from distributed_astra.models.lm import forward_logits, summed_token_loss  # noqa: E402
from distributed_astra.models.load import prepare_for_attribution  # noqa: E402
from distributed_astra.models.modules import select_tracked_modules  # noqa: E402
from distributed_astra.models.tiny import build_tiny_gpt2  # noqa: E402
from distributed_astra.scoring.gradients import captured_batches  # noqa: E402
from distributed_astra.scoring.low_rank import stored_direction  # noqa: E402
from distributed_astra.scoring.topk import StreamingTopK  # noqa: E402
from distributed_astra.stages.score import step_scores  # noqa: E402

VOCAB, N_LAYER, N_HEAD, N_EMBD, SEQ_LEN = 4096, 2, 4, 128, 64  # bench_fit_score's model
PATTERNS = ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj", "transformer.h.*.attn.c_attn",
            "transformer.h.*.attn.c_proj"]
TARGET = 1.3  # the target: scoring at Q = 100 within 1.3 x a plain forward+backward
FIDELITY_RANKS: list[int | None] = [1, 2, 4, 8, 16, 32, 64, None]
FIDELITY_DTYPES = ["float32", "bfloat16"]
OVERLAP_TARGET = 0.95
TITLE = "# Scoring: throughput against forward+backward, and low-rank / bfloat16 directions"
THROUGHPUT, FIDELITY = "Throughput", "Low-rank fidelity"
SECTION_ORDER = [THROUGHPUT, FIDELITY]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    return "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])


def machine_line(threads: int | None) -> str:
    torch_threads = f"`torch.set_num_threads({threads})`" if threads else f"{torch.get_num_threads()} torch threads"
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), no GPU, shared; torch {torch.__version__}, "
            f"{torch_threads}; Python {platform.python_version()}.")


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


# ------------------------------------------------------------------------------------------------ the page
def write_section(path: Path, title: str, body: list[str]) -> None:
    """Replace the `## title` section of the page (up to the next `## ` heading) with `body`, keeping every other
    section (the other mode's, or one written by hand) where it is; written atomically."""
    sections: dict[str, str] = {}
    if path.is_file():
        current = None
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                current = line[3:].strip()
                sections[current] = ""
            elif current is not None:
                sections[current] += line + "\n"
    sections[title] = "\n".join(body).strip("\n") + "\n\n"
    order = [t for t in SECTION_ORDER if t in sections] + [t for t in sections if t not in SECTION_ORDER]
    text = TITLE + "\n\n" + "".join(f"## {t}\n\n{sections[t].strip(chr(10))}\n\n" for t in order)
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n")


# ------------------------------------------------------------------------------------------------ throughput
def lm_batches(num: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (num, SEQ_LEN), generator=g)
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size]),
             "labels": ids[i : i + batch_size].clone(), "doc_id": torch.arange(i, min(i + batch_size, num))}
            for i in range(0, num, batch_size)]


def run_fwd_bwd(plain_model, batches) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        plain_model.zero_grad(set_to_none=True)
        summed_token_loss(forward_logits(plain_model, batch), batch["labels"]).sum().backward()
    return time.perf_counter() - t0


def run_scoring(model, tracked, batches, directions, num_queries: int, compute: torch.dtype) -> float:
    """The score stage's work per batch on one rank (stages/score.py: score_shard): captured_batches, step_scores
    against every module's held directions, the scores to the CPU, the top-k."""
    owners = {name: 0 for name in directions}
    top = StreamingTopK(num_queries, 10)
    t0 = time.perf_counter()
    for batch, capture in captured_batches(model, tracked, batches, compute):
        scores = step_scores(capture, directions, owners, [len(batch["doc_id"])], num_queries, compute)
        top.update(batch["doc_id"], scores.cpu())
    top.finish()
    return time.perf_counter() - t0


def run_capture(model, tracked, batches, compute: torch.dtype) -> float:
    """The floor of every scoring contender: captured_batches and the Ds / ā every module's products read
    (capture.output_grad, capture.activation), no products."""
    t0 = time.perf_counter()
    for _, capture in captured_batches(model, tracked, batches, compute):
        for name in tracked:
            capture.output_grad(name)
            capture.activation(name)
    return time.perf_counter() - t0


def direction_bytes(directions: dict) -> int:
    return sum(d.nbytes for d in directions.values())


def forward_macs_per_token(tracked) -> dict[str, float]:
    """Multiply-adds per token: the model's forward (tracked linears, attention QKᵀ and AV over T positions, the
    tied lm_head), fwd_bwd ≈ 3 x forward (input and weight gradients), the capture ≈ 2 x (no weight gradients)."""
    linear = sum(t.out_features * t.in_features for t in tracked.values())
    forward = linear + N_LAYER * 2 * SEQ_LEN * N_EMBD + VOCAB * N_EMBD
    return {"forward": forward, "fwd_bwd": 3 * forward, "capture": 2 * forward}


def scoring_macs_per_token(tracked, num_queries: int, rank: int | None, batch_size: int) -> float:
    """module_scores' multiply-adds per token: dense, the cheaper of materialised B·O·I·(T+Q) and per-token
    Q·B·T·O·I (the rule of scoring/inner_products.py); LowRank, B·T·Q·r·(O+I)."""
    total = 0.0
    for t in tracked.values():
        out_dim, in_dim = t.out_features, t.in_dim
        if rank is None:
            total += min(batch_size * out_dim * in_dim * (SEQ_LEN + num_queries),
                         num_queries * batch_size * SEQ_LEN * out_dim * in_dim)
        else:
            r = min(rank, out_dim, in_dim)
            total += batch_size * SEQ_LEN * num_queries * r * (out_dim + in_dim)
    return total / (batch_size * SEQ_LEN)


def break_even(tracked, qs: list[int]) -> dict[int, tuple[float, float]]:
    """Per Q: the (smallest, largest) over modules of the rank below which `LowRank.scores` costs fewer
    multiply-adds than the dense `module_scores` (B cancels)."""
    out = {}
    for q in qs:
        ranks = [min(t.out_features * t.in_dim * (SEQ_LEN + q), q * SEQ_LEN * t.out_features * t.in_dim)
                 / (SEQ_LEN * q * (t.out_features + t.in_dim)) for t in tracked.values()]
        out[q] = (min(ranks), max(ranks))
    return out


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    model = build_tiny_gpt2(VOCAB, N_LAYER, N_HEAD, N_EMBD, SEQ_LEN, seed=0).eval()
    ours = prepare_for_attribution(copy.deepcopy(model))
    tracked = select_tracked_modules(ours, PATTERNS)
    plain = copy.deepcopy(model).requires_grad_(True)
    compute = product_dtype(ours, torch.float64)  # the score stage's rule, factors.dtype float64 (the default)
    batches = lm_batches(args.train, args.batch_size)
    qs = [int(q) for q in args.queries.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else []
    variants = [(None, "float32"), (None, "bfloat16")] + [(r, d) for r in ranks for d in ("float32", "bfloat16")]

    g = torch.Generator().manual_seed(1)
    held: dict[tuple[int, int | None, str], dict] = {}
    prep: dict[tuple[int, int | None, str], float] = {}
    for q in qs:
        raw = {n: torch.randn(q, *t.shape, generator=g) for n, t in tracked.items()}
        for rank, dtype in variants:
            t0 = time.perf_counter()
            sc = ScoringConfig(direction_rank=rank, direction_dtype=dtype)
            held[q, rank, dtype] = {n: stored_direction(x, sc, compute) for n, x in raw.items()}
            prep[q, rank, dtype] = time.perf_counter() - t0
        del raw

    def label(q, rank, dtype):
        return f"Q{q} {'full' if rank is None else f'r{rank}'}/{dtype}"

    contenders = {"fwd_bwd": lambda: run_fwd_bwd(plain, batches),
                  "capture": lambda: run_capture(ours, tracked, batches, compute)}
    for key, directions in held.items():
        contenders[label(*key)] = (lambda d=directions, q=key[0]: run_scoring(ours, tracked, batches, d, q, compute))
    names = list(contenders)
    # Untimed warm-up of every contender on two batches (lazy initialisation, einsum paths, allocator).
    warm = batches[:2]
    run_fwd_bwd(plain, warm)
    run_capture(ours, tracked, warm, compute)
    for key, directions in held.items():
        run_scoring(ours, tracked, warm, directions, key[0], compute)
    times: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            times[name].append(contenders[name]())
        log(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names))
    med = {k: statistics.median(v) for k, v in times.items()}
    macs = forward_macs_per_token(tracked)
    rows = []
    for (q, rank, dtype), directions in held.items():
        name = label(q, rank, dtype)
        predicted = (macs["capture"] + scoring_macs_per_token(tracked, q, rank, args.batch_size)) / macs["fwd_bwd"]
        rows.append({"queries": q, "rank": rank, "dtype": dtype, "seconds": med[name],
                     "ratio": med[name] / med["fwd_bwd"], "all": times[name],
                     "direction_bytes": direction_bytes(directions), "prepare_seconds": prep[q, rank, dtype],
                     "predicted_ratio": predicted,
                     "kind": type(next(iter(directions.values()))).__name__})
    tokens = args.train * SEQ_LEN
    ctx = {
        "capture": med["capture"], "capture_all": times["capture"],
        "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
        "load_before": load_before, "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "train": args.train, "batch_size": args.batch_size, "repeats": args.repeats, "tokens": tokens,
        "fwd_bwd": med["fwd_bwd"], "fwd_bwd_all": times["fwd_bwd"], "rows": rows, "macs": macs, "compute": compute,
        "qs": qs, "ranks": ranks, "wall": time.perf_counter() - start,
    }
    write_section(args.out, THROUGHPUT, throughput_section(ctx, tracked))
    by = {(r["queries"], r["rank"], r["dtype"]): r for r in rows}
    ratios = {f"Q{q}": {("full" if r is None else f"r{r}") + "/" + d: round(by[q, r, d]["ratio"], 3)
                        for r, d in variants} for q in qs}
    qmax = max(qs)
    full = by[qmax, None, "float32"]["ratio"]
    best = min((by[qmax, r, d] for r, d in variants), key=lambda row: row["ratio"])
    return {
        "mode": "throughput", "ratios_to_fwd_bwd": ratios, "fwd_bwd_seconds": round(med["fwd_bwd"], 3),
        f"full_float32_ratio_at_Q{qmax}": round(full, 3),
        f"best_at_Q{qmax}": {"variant": ("full" if best["rank"] is None else f"r{best['rank']}") + "/" + best["dtype"],
                             "ratio": round(best["ratio"], 3)},
        "capture_ratio": round(med["capture"] / med["fwd_bwd"], 3),
        "target": TARGET, "target_met_full_float32": full <= TARGET,
        "direction_bytes": {f"Q{q}": {("full" if r is None else f"r{r}") + "/" + d: by[q, r, d]["direction_bytes"]
                                      for r, d in variants} for q in qs},
        "train": args.train, "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
        "cores": os.cpu_count(), "report": str(args.out), "wall_seconds": round(time.perf_counter() - start, 1),
    }


def throughput_section(ctx: dict, tracked) -> list[str]:
    rows, macs = ctx["rows"], ctx["macs"]
    fb, qmax = ctx["fwd_bwd"], max(ctx["qs"])
    modules = ", ".join(sorted({f"{n.split('.', 3)[-1]} {t.out_features}x{t.in_dim}" for n, t in tracked.items()}))
    repeats = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [
        f"Generated by `{ctx['command']}` on {ctx['date']} ({ctx['wall']:.0f} s). {machine_line(ctx['threads'])} "
        f"Load average before/after: {ctx['load_before']} / {ctx['load_after']} (the machine is shared: repeats "
        "are interleaved round-robin with a rotating order and medians reported).",
        "",
        f"Workload: the demo-sized tiny GPT-2 of bench_fit_score (vocab {VOCAB}, {N_LAYER} layers, n_embd {N_EMBD}, "
        f"{N_HEAD} heads, {SEQ_LEN} tokens, random init, float32), {len(tracked)} tracked modules ([out, in+1]: "
        f"{modules}, both blocks), {ctx['train']} uniform random sequences x {SEQ_LEN} tokens "
        f"({ctx['tokens']:,} tokens) in batches of {ctx['batch_size']}; random directions of the right shapes; "
        f"products in {str(ctx['compute']).replace('torch.', '')} (`product_dtype`, what the score stage and a GPU "
        f"use). {ctx['repeats']} repeat{'s' if ctx['repeats'] > 1 else ''} after one untimed warm-up of every "
        "contender.",
        "",
        f"- **fwd_bwd**: forward + ordinary `loss.backward()` (weight gradients allocated): median {fb:.2f} s "
        f"({ctx['tokens'] / fb:,.0f} tokens/s; repeats {repeats(ctx['fwd_bwd_all'])}).",
        f"- **capture**: `captured_batches` + every module's Ds and ā (`output_grad`, `activation`), no products: "
        f"the floor of every scoring row, median {ctx['capture']:.2f} s = **{ctx['capture'] / fb:.2f}x** fwd_bwd "
        f"(repeats {repeats(ctx['capture_all'])}).",
        "- **scoring**: the score stage's per-batch work (`captured_batches` + `stages.score.step_scores` + top-k), "
        "directions held as `scoring.low_rank.stored_direction` makes them (`full` = `scoring.direction_rank: null`, "
        "`rank k` = rank-k `LowRank` factors; the dtype is `scoring.direction_dtype`).",
        "",
        "| Q | directions | median s | ratio to fwd_bwd | predicted ratio (multiply-adds) | direction bytes held (MiB) "
        "| prepare s (once per run) | all repeats (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        what = "full" if r["rank"] is None else f"rank {r['rank']}"
        mark = " ✓" if r["queries"] == qmax and r["ratio"] <= TARGET else ""
        lines.append(
            f"| {r['queries']} | {what} {r['dtype']} | {r['seconds']:.2f} | **{r['ratio']:.2f}**{mark} | "
            f"{r['predicted_ratio']:.2f} | {mib(r['direction_bytes'])} | {r['prepare_seconds']:.2f} | "
            f"{repeats(r['all'])} |")
    by = {(r["queries"], r["rank"], r["dtype"]): r for r in rows}
    full = by[qmax, None, "float32"]
    best = min((r for r in rows if r["queries"] == qmax), key=lambda r: r["ratio"])
    lines += [
        "",
        f"Target (the issue): scoring at Q = {qmax} within {TARGET}x a plain forward+backward. Full-rank float32: "
        f"**{full['ratio']:.2f}x** ({'met' if full['ratio'] <= TARGET else 'NOT met'}); the fastest variant "
        f"at Q = {qmax}: {'full' if best['rank'] is None else 'rank ' + str(best['rank'])} {best['dtype']}, "
        f"{best['ratio']:.2f}x ({'met' if best['ratio'] <= TARGET else 'NOT met'}). ✓ marks the Q = {qmax} rows within the target.",
        "",
        "Reading the table:",
        "",
        f"- The predicted ratio counts multiply-adds per token: fwd_bwd ≈ 3 x forward ({macs['fwd_bwd'] / 1e6:.2f} M: "
        f"input and weight gradients), the capture ≈ 2 x forward ({macs['capture'] / 1e6:.2f} M: no weight "
        "gradients, `autograd.grad` to the tracked outputs only), plus `module_scores`: dense, the cheaper of "
        "materialising per-sequence gradients B·O·I·(T+Q) and the per-token form Q·B·T·O·I; `LowRank`, "
        f"B·T·Q·r·(O+I). The measured capture is {ctx['capture'] / fb:.2f}x, not 0.67x: the softmax over the "
        "vocabulary, GELU, layer norms, the hooks' finite checks and the Ds/ā casts and masks do not shrink with "
        f"the weight gradients. That leaves {TARGET - ctx['capture'] / fb:.2f}x fwd_bwd for the products at "
        f"Q = {qmax} to meet the target.",
        "- `module_scores`' materialised path is one bmm (the per-sequence gradients [B, O, I]) and one matmul "
        "[B, O·I] @ [O·I, Q]; the same contraction as `einsum(\"boi,qoi->bq\")`, its earlier form, ran 3-4x "
        "slower on this CPU (torch " + torch.__version__ + "; about 100 ms against 23 ms for one 512x129 module, "
        "B = 32, Q = 100), 1.55-1.67x fwd_bwd at Q = 100 in the run before the change.",
        "- Low rank saves memory (the direction bytes), not time, on modules this small: its B·T·Q·r·(O+I) is below "
        "the dense cost only for r < min(B·O·I·(T+Q), Q·B·T·O·I) / (B·T·Q·(O+I)), here "
        + "; ".join(f"r < {lo:.1f}-{hi:.1f} at Q = {q}" for q, (lo, hi) in break_even(tracked, ctx["qs"]).items())
        + " over the modules, and `LowRank.scores` has no materialised alternative. It pays where the dense "
        "directions do not fit (Q·Σ O·I numbers per rank: "
        f"{mib(full['direction_bytes'])} MiB here at Q = {qmax} in float32; configs/gpt2xl.yaml's 96 MLP modules "
        "hold 0.98 G numbers, 3.9 GB, per query) and on wide modules with long sequences: at GPT-2 XL's c_fc "
        "(6400x1601, T = 512) the break-even at Q = 100 is r ≈ 15. Its one-off cost is the prepare column: `low_rank` runs a full float64 "
        "SVD of every query's [out, in+1] block, one query at a time, each time the directions are loaded "
        "(`held_directions`, once per rank per run).",
        "- bfloat16 storage halves the bytes; dense bfloat16 directions are cast to the products' dtype in every "
        "batch (`module_scores` casts them in blocks of up to 2^28 numbers, here every query of a module at once, per batch), "
        "the difference between the `full bfloat16` and `full float32` rows (within the noise at these sizes).",
    ]
    return lines


# ------------------------------------------------------------------------------------------------ fidelity
def fidelity_runs(args) -> list[tuple[str, str, list[str]]]:
    """(name, description, config overrides) of the two runs re-scored."""
    base = ["tracking.wandb_mode=disabled"]
    quick = ["data.num_stdlib_docs=300", "data.num_facts=10", "model.tiny.train_steps=200"] if args.quick else []
    second = [s for s in args.second.split(",") if s]
    return [
        ("demo", "the demo (`dastra demo`: configs/tiny.yaml, model.tiny.seed 0, n_embd 128)", base + quick),
        ("second", "the demo pipeline with " + ", ".join(f"`{s}`" for s in second), base + quick + second),
    ]


def prepared_context(cfg, seconds: dict, prefix: str):
    """The run's context with factors, query gradients and solved directions of `solver.name`: reused when the run
    directory already holds them for this model, corpus and queries (`dastra demo` made it, or an earlier run of
    this benchmark), else computed by the pipeline's own stages."""
    from distributed_astra import pipeline
    from distributed_astra.context import check_directions, open_context
    from distributed_astra.errors import DastraError
    from distributed_astra.stages.score import scoring_passes

    t0 = time.perf_counter()
    ctx = open_context(cfg, "bench-scoring")
    seconds[prefix + " prepare"] = time.perf_counter() - t0
    for name, stage in (("fit", pipeline.fit), ("query", pipeline.query)):
        t0 = time.perf_counter()
        if not pipeline.reused(ctx, name)[0]:
            stage(ctx)
            seconds[f"{prefix} {name}"] = time.perf_counter() - t0
    try:
        check_directions(ctx)
        scoring_passes(ctx)
        log(f"{prefix}: reusing the solved {cfg.solver.name} directions of {cfg.output.run_dir}")
    except DastraError:
        t0 = time.perf_counter()
        pipeline.solve(ctx)
        seconds[prefix + " solve"] = time.perf_counter() - t0
    return ctx


def variant_name(rank: int | None, dtype: str) -> str:
    return f"{'full' if rank is None else f'r{rank}'}-{dtype}"


def rescore(ctx, rank: int | None, dtype: str):
    """The score stage with scoring.direction_rank / direction_dtype overridden, into the variant's own results
    folder (baselines/bench-scoring-<variant>/: scores/ with its manifest, topk.parquet): (top-k table, seconds,
    direction bytes held, resumed)."""
    from distributed_astra import pipeline

    scoring = ctx.cfg.scoring.model_copy(update={"direction_rank": rank, "direction_dtype": dtype})
    other = replace(ctx, cfg=ctx.cfg.model_copy(update={"scoring": scoring}),
                    paths=replace(ctx.paths, baseline=f"bench-scoring-{variant_name(rank, dtype)}"))
    manifest = other.paths.scores / "manifest.json"
    before = manifest.read_text() if manifest.is_file() else None
    t0 = time.perf_counter()
    table = pipeline.score(other)
    seconds = time.perf_counter() - t0
    after = json.loads(manifest.read_text())
    resumed = before is not None and json.loads(before)["shards"].keys() == after["shards"].keys() and all(
        json.loads(before)["shards"][s]["finished_at"] == after["shards"][s]["finished_at"] for s in after["shards"])
    held = max(sum(rec["direction_bytes"]) for rec in after["shards"].values())
    shard_seconds = sum(rec["seconds"] for rec in after["shards"].values())
    return table, seconds, shard_seconds, held, resumed


def truncation_error(ctx, ranks: list[int | None]) -> dict[int | None, float]:
    """Per rank: the mean over queries of ‖X_q − X_q,r‖ / ‖X_q‖ (Frobenius, every tracked module of the query's
    direction together; r capped per module at min(out, in+1) as `low_rank` does), from the singular values of the
    solved directions (Eckart-Young: the dropped singular values are the error)."""
    from distributed_astra.artifacts import load_tensors
    from distributed_astra.stages.score import scoring_passes

    _, _, passes = scoring_passes(ctx)
    tensors = load_tensors(Path(passes[0].file), "solved directions", "solve", names=list(ctx.tracked))
    total = dropped = None
    dropped = {r: 0.0 for r in ranks}
    for x in tensors.values():
        s2 = torch.linalg.svdvals(x.to(torch.float64)) ** 2  # [Q, min(out, in+1)], descending
        total = s2.sum(dim=1) if total is None else total + s2.sum(dim=1)
        for r in ranks:
            dropped[r] = dropped[r] + (s2[:, r:].sum(dim=1) if r is not None else 0.0)
    return {r: float((torch.as_tensor(d) / total).sqrt().mean()) if r is not None else 0.0 for r, d in dropped.items()}


def same_topk(a, b) -> bool:
    """Two top-k tables list the same documents in the same order for every query."""
    key = lambda t: sorted(zip(t.column("query_id").to_pylist(), t.column("rank").to_pylist(),  # noqa: E731
                               t.column("doc_id").to_pylist()), key=lambda row: (str(row[0]), row[1]))
    return key(a) == key(b)


def first_docs(table) -> dict:
    return {row["query_id"]: row["doc_id"] for row in table.select(["query_id", "rank", "doc_id"]).to_pylist()
            if row["rank"] == 1}


def top_sets(table) -> dict:
    out: dict = defaultdict(set)
    for row in table.select(["query_id", "rank", "doc_id"]).to_pylist():
        if row["rank"] <= 10:
            out[row["query_id"]].add(row["doc_id"])
    return out


def fidelity_of_run(args, name: str, overrides: list[str], seconds: dict) -> dict:
    from distributed_astra.data.sequences import load_queries
    from distributed_astra.eval.recall import fact_recall
    from distributed_astra.progress import console

    run_dir = Path(args.fidelity_dir) / name
    cfg = load_config(None, [f"output.run_dir={run_dir}", "scoring.top_k=10", *overrides])
    ctx = prepared_context(cfg, seconds, name)
    console.quiet = True
    try:
        queries = load_queries(ctx.queries)
        ranks = FIDELITY_RANKS
        variants = [(None, "float32")] + [(r, d) for d in FIDELITY_DTYPES for r in ranks if (r, d) != (None, "float32")]
        rows = []
        ref = None
        for rank, dtype in variants:
            table, secs, shard_secs, held, resumed = rescore(ctx, rank, dtype)
            recall = fact_recall(table, queries)
            tops = top_sets(table)
            if ref is None:
                ref = tops
            overlaps = [len(tops[q] & ref[q]) / 10 for q in ref]
            firsts = first_docs(table)
            if rank is None and dtype == "float32":
                ref_first, ref_table = firsts, table
            rows.append({"rank": rank, "dtype": dtype, "overlap_mean": statistics.mean(overlaps),
                         "top1_agreement": statistics.mean(firsts.get(q) == d for q, d in ref_first.items()),
                         "overlap_min": min(overlaps), "recall@1": recall.get("recall@1"),
                         "recall@10": recall.get("recall@10"), "mrr": recall.get("mrr"),
                         "num_fact_queries": recall["num_fact_queries"], "direction_bytes": held,
                         "seconds": secs, "shard_seconds": shard_secs, "resumed": resumed})
            log(f"{name} {variant_name(rank, dtype)}: overlap {rows[-1]['overlap_mean']:.3f} (min "
                f"{rows[-1]['overlap_min']:.1f}), recall@1 {recall.get('recall@1')}, recall@10 "
                f"{recall.get('recall@10')}, MRR {recall.get('mrr')}, {held / 2**20:.2f} MiB, {secs:.1f} s"
                + (" (resumed)" if resumed else ""))
        shapes = {n: t.shape for n, t in ctx.tracked.items()}
        tiny = cfg.model.tiny
        info = {"num_documents": None, "num_queries": len(ref), "shapes": shapes, "run_dir": str(run_dir),
                "model": f"n_embd {tiny.n_embd}, {tiny.n_layer} layers, {tiny.n_head} heads, seed {tiny.seed}, "
                         f"{tiny.train_steps} training steps",
                "solver": f"{cfg.solver.name}, {cfg.solver.iterations} iterations",
                "num_fact_queries": rows[0]["num_fact_queries"]}
        errors = truncation_error(ctx, ranks)
        for r in rows:
            r["truncation_error"] = errors[r["rank"]]
        info["run_topk_identical"] = same_topk(ref_table, pq.read_table(ctx.paths.topk)) if (
            ctx.paths.topk.is_file()) else None
        manifest = json.loads((ctx.paths.results / "baselines" / f"bench-scoring-{variant_name(None, 'float32')}"
                               / "scores" / "manifest.json").read_text())
        info["num_documents"] = sum(rec["num_documents"] for rec in manifest["shards"].values())
        info["num_sequences"] = sum(rec["num_sequences"] for rec in manifest["shards"].values())
        return {"rows": rows, "info": info}
    finally:
        console.quiet = False
        ctx.close()


def recall_kept(row: dict, ref: dict) -> bool:
    """Fact tracing as good as full-rank float32: recall@1 and recall@10 equal, MRR not lower (a low rank may move
    a planted document up as well as down)."""
    if ref["num_fact_queries"] == 0:
        return True
    return (row["recall@1"] == ref["recall@1"] and row["recall@10"] == ref["recall@10"]
            and row["mrr"] >= ref["mrr"] - 1e-12)


def adequate(rows: list[dict], dtype: str, overlap: float = OVERLAP_TARGET) -> int | None | str:
    """The smallest rank of `dtype` with mean top-10 overlap ≥ `overlap` and fact tracing kept (`recall_kept`)
    against full-rank float32 ('none' when no rank qualifies; None means full rank)."""
    ref = rows[0]
    for r in sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: float("inf") if r["rank"] is None
                    else r["rank"]):
        if r["overlap_mean"] >= overlap and recall_kept(r, ref):
            return r["rank"]
    return "none"


def fidelity(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    seconds: dict[str, float] = {}
    results = {}
    for name, description, overrides in fidelity_runs(args):
        results[name] = {**fidelity_of_run(args, name, overrides, seconds), "description": description}
    def on_both(ranks: list) -> int | None | str:
        return "none" if "none" in ranks else (None if None in ranks else max(ranks))

    smallest, recall_only = {}, {}
    for dtype in FIDELITY_DTYPES:
        per_run = {n: adequate(r["rows"], dtype) for n, r in results.items()}
        smallest[dtype] = {"per_run": per_run, "both": on_both(list(per_run.values()))}
        per_run = {n: adequate(r["rows"], dtype, overlap=0.0) for n, r in results.items()}
        recall_only[dtype] = {"per_run": per_run, "both": on_both(list(per_run.values()))}
    ctx = {"command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
           "load_before": load_before, "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
           "wall": time.perf_counter() - start, "seconds": seconds, "results": results, "smallest": smallest,
           "recall_only": recall_only}
    write_section(args.out, FIDELITY, fidelity_section(ctx))

    def fmt_rank(r):
        return "full" if r is None else r

    return {
        "mode": "fidelity",
        "runs": {n: {variant_name(r["rank"], r["dtype"]): {"overlap": round(r["overlap_mean"], 4),
                                                            "recall@1": r["recall@1"], "recall@10": r["recall@10"],
                                                            "mrr": None if r["mrr"] is None else round(r["mrr"], 4),
                                                            "direction_bytes": r["direction_bytes"]}
                     for r in res["rows"]} for n, res in results.items()},
        "smallest_adequate_rank": {d: {"both": fmt_rank(s["both"]),
                                       "per_run": {n: fmt_rank(v) for n, v in s["per_run"].items()}}
                                   for d, s in smallest.items()},
        "smallest_rank_keeping_recall": {d: {"both": fmt_rank(s["both"]),
                                             "per_run": {n: fmt_rank(v) for n, v in s["per_run"].items()}}
                                         for d, s in recall_only.items()},
        "overlap_target": OVERLAP_TARGET, "report": str(args.out),
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def fidelity_section(ctx: dict) -> list[str]:
    results, smallest = ctx["results"], ctx["smallest"]
    built = ", ".join(f"{k} {v:.0f} s" for k, v in ctx["seconds"].items() if not k.endswith("prepare") or v > 5)
    lines = [
        f"Generated by `{ctx['command']}` on {ctx['date']} ({ctx['wall']:.0f} s in all"
        + (f"; building the runs: {built}" if built else "; both runs reused") + f"). {machine_line(ctx['threads'])} "
        f"Load average before/after: {ctx['load_before']} / {ctx['load_after']}.",
        "",
        "How it was obtained: the script builds (once, then reuses) two runs of the demo pipeline under "
        "--fidelity-dir, fit + query + ASTRA solve (`dastra demo`'s settings, configs/tiny.yaml), and re-scores "
        "the SAME solved ASTRA directions of each with the score stage for every `scoring.direction_rank` × "
        "`scoring.direction_dtype`, each variant into its own results folder (`baselines/bench-scoring-<variant>/`, "
        "so the run's own topk.parquet stays as it was). From the command line the same re-scoring is, on a copy "
        "of the run directory:",
        "",
        "```bash",
        "dastra score --run-dir /tmp/bench_scoring/demo-copy --set scoring.direction_rank=8 "
        "--set scoring.direction_dtype=bfloat16",
        "```",
        "",
        "(scores/manifest.json records the hash of the scoring section, so a changed rank or dtype re-scores every "
        "shard). Measured against full-rank float32 of the same directions: the mean over queries of the top-10 "
        "overlap |top10 ∩ top10_full| / 10 (and its minimum over queries), and fact-tracing recall@1 / recall@10 / "
        "MRR of the planted documents (`eval.recall.fact_recall`, as `dastra demo` reports). "
        "Direction bytes are what the score stage held (scores/manifest.json, `direction_bytes`).",
        "",
    ]
    for name, res in results.items():
        info = res["info"]
        shapes = ", ".join(f"{n.split('.', 3)[-1]} {o}x{i}" for n, (o, i) in
                           sorted({n.split('.', 3)[-1]: s for n, s in info["shapes"].items()}.items()))
        lines += [
            f"### {name}: {res['description']}",
            "",
            f"Model: {info['model']}; {len(info['shapes'])} tracked modules ([out, in+1]: {shapes}; each block); "
            f"solver {info['solver']}; {info['num_queries']} queries ({info['num_fact_queries']} with a planted "
            f"document) over {info['num_documents']:,} documents ({info['num_sequences']:,} sequences); run "
            f"directory {info['run_dir']}."
            + ("" if info["run_topk_identical"] is None else
               " The re-scored full-rank float32 top-10 is " + ("identical to" if info["run_topk_identical"] else
                                                             "NOT identical to") + " the run's own topk.parquet."),
            "",
            "| direction_rank | direction_dtype | ‖X − X_r‖ / ‖X‖ | mean top-10 overlap | min overlap | top-1 agreement "
            "| recall@1 | recall@10 | MRR | direction bytes (MiB) | score s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        fmt = (lambda v: "—" if v is None else f"{v:.3f}")  # noqa: E731
        order = sorted(res["rows"], key=lambda r: (FIDELITY_DTYPES.index(r["dtype"]),
                                                   float("inf") if r["rank"] is None else r["rank"]))
        for r in order:
            ref = " (reference)" if r["rank"] is None and r["dtype"] == "float32" else ""
            lines.append(
                f"| {'null' if r['rank'] is None else r['rank']} | {r['dtype']}{ref} | {r['truncation_error']:.3f} | "
                f"{r['overlap_mean']:.3f} | {r['overlap_min']:.1f} | {r['top1_agreement']:.3f} | "
                f"{fmt(r['recall@1'])} | {fmt(r['recall@10'])} | {fmt(r['mrr'])} | {mib(r['direction_bytes'])} | "
                f"{r['shard_seconds']:.1f}{' (resumed)' if r['resumed'] else ''} |")
        lines.append("")

    def fmt_rank(r):
        return "null (full rank)" if r is None else ("none of the ranks tried" if r == "none" else str(r))

    lines += [
        f"Smallest `scoring.direction_rank` with mean top-10 overlap ≥ {OVERLAP_TARGET} and fact tracing unchanged "
        "(recall@1 and recall@10 equal to full-rank float32, MRR not lower):",
        "",
    ]
    for dtype, s in smallest.items():
        per = "; ".join(f"{n}: {fmt_rank(v)}" for n, v in s["per_run"].items())
        lines.append(f"- `direction_dtype: {dtype}`: **{fmt_rank(s['both'])}** on both models ({per}).")
    lines += ["", "Fact tracing alone (whatever the overlap), the smallest rank that keeps it:", ""]
    for dtype, s in ctx["recall_only"].items():
        per = "; ".join(f"{n}: {fmt_rank(v)}" for n, v in s["per_run"].items())
        lines.append(f"- `direction_dtype: {dtype}`: {fmt_rank(s['both'])} on both models ({per}).")
    return lines


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (small sizes); the page goes to /tmp")
    parser.add_argument("--fidelity", action="store_true", help="the low-rank fidelity section instead of throughput")
    parser.add_argument("--train", type=int, default=None, help="throughput: training sequences (default 192; quick 64)")
    parser.add_argument("--queries", default=None, help="throughput: comma-separated Q values (default 1,16,100)")
    parser.add_argument("--ranks", default="8,16", help="throughput: low ranks timed, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="throughput: interleaved repeats (default 3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every contender")
    parser.add_argument("--fidelity-dir", default=None,
                        help="fidelity: where the two runs live (default /tmp/bench_scoring; quick /tmp/bench_scoring/quick)")
    parser.add_argument("--second", default="model.tiny.seed=1,model.tiny.n_embd=192",
                        help="fidelity: comma-separated overrides of the second run (the first is the demo)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the page (default docs/results/scoring.md; quick /tmp/bench_scoring/scoring.md)")
    args = parser.parse_args()
    args.train = args.train or (64 if args.quick else 192)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.queries = args.queries or ("1,16" if args.quick else "1,16,100")
    args.fidelity_dir = args.fidelity_dir or ("/tmp/bench_scoring/quick" if args.quick else "/tmp/bench_scoring")
    args.out = args.out or (Path("/tmp/bench_scoring/scoring.md") if args.quick else ROOT / "docs/results/scoring.md")
    result = fidelity(args) if args.fidelity else throughput(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
