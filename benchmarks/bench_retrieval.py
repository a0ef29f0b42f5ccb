"""Retrieval through the projected gradient store and faiss, against exhaustive exact scoring (issues 6, 18).

    python benchmarks/bench_retrieval.py            # ≈ 30 min on the shared 2-core machine, 1 thread
    python benchmarks/bench_retrieval.py --quick    # 1500 documents, 16 fact queries, writes to /tmp

Setup: the demo pipeline (configs/tiny.yaml: tiny GPT-2 n_embd 128, 2 layers, 8 tracked modules, trained on the
demo corpus) on a larger demo corpus (4000 stdlib documents + 40 planted facts), EK-FAC factors from the first 2048
sequences, the 80 demo fact queries solved with EK-FAC and with ASTRA at the auto damping. Measured, in one run:

  exact      `pipeline.score` with scoring.dense: the exhaustive exact scores of every document (full gradients,
             Σ_t Ds_tᵀ X ā_t) and the time of exact streaming scoring of the corpus
  index      `pipeline.index` at the default projection (16 x 16 per module): store + flat index
  search     faiss search of the projected queries (flat, IVF-Flat, IVF-PQ + exact IndexRefine), against the exact time
  recall     IVF-PQ + refine and IVF-Flat top-10 against flat at the calibrated default probing (index/meta.json),
             on this store and on the stores of demo models of seeds IVF_SEEDS (runs/bench-retrieval-seed<s>)
  two-stage  `pipeline.search` for EK-FAC and ASTRA: shortlist top_k x shortlist_factor, exact re-score, top-10;
             agreement with the exhaustive exact top-10, next to the recall the search estimated itself
  frontier   one extra pass with full per-sequence gradients: two-stage recall of the exact top-10 against the
             fraction of the corpus re-scored, for EK-FAC, ASTRA and gradient-similarity directions, plain and
             EK-FAC-whitened projections at several dimensions, and norm-bound early stopping of the exact re-score

Writes docs/results/retrieval.md (text below its analysis marker line is kept) and prints one final JSON line.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shutil
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from distributed_astra import context, pipeline  # noqa: E402
from distributed_astra.config import load_config  # noqa: E402
from distributed_astra.curvature.covariance import product_dtype  # noqa: E402
from distributed_astra.curvature.factors import load_factors  # noqa: E402
from distributed_astra.errors import DastraError  # noqa: E402
from distributed_astra.index import stages  # noqa: E402
from distributed_astra.index.calibration import preconditioned_queries  # noqa: E402
from distributed_astra.index.faiss_index import (  # noqa: E402
    CALIBRATION_QUERIES,
    build_index,
    calibrate_nprobe,
    calibration_target,
    load_index,
    sample_positions,
    search_index,
)
from distributed_astra.index.store import open_store  # noqa: E402
from distributed_astra.progress import console  # noqa: E402
from distributed_astra.scoring.gradients import captured_batches  # noqa: E402
from distributed_astra.scoring.projection import KroneckerProjection  # noqa: E402

TOP_K = 10
CURVE_DIMS = (16, 32, 64)
SHORTLIST_FRACTIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2)
IVF_SEEDS = (1, 2)  # demo models of other seeds: IVF recall against flat on their stores
ANALYSIS_MARKER = "<!-- analysis: kept when the benchmark rewrites this file -->"


def log(message: str) -> None:
    print(message, flush=True)


def factors_reusable(ctx) -> bool:
    """The run directory already holds factors of this model and config (a rerun of the benchmark)."""
    try:
        load_factors(ctx.paths.factors, context.factor_meta(ctx))
    except DastraError:
        return False
    return True


def effective_dimension(ctx, damping: float) -> tuple[float, int]:
    """d_eff = Σ Λ/(Λ + λ) over every tracked entry: the dimension the EK-FAC-weighted scores live in."""
    factors = load_factors(ctx.paths.factors, None)
    total, count = 0.0, 0
    for name in factors.names:
        lam = factors.eigenvalues(name, ctx.cfg.factors.strategy)
        total += float((lam / (lam + damping)).sum())
        count += lam.numel()
    return total, count


def norm_bound_fraction(scores: np.ndarray, doc_norms: np.ndarray, query_norm: float) -> float:
    """The fraction of documents re-scored exactly, in decreasing norm, before the Cauchy-Schwarz bound of every
    remaining one (its norm x the query's) is below the k-th exact score found so far: the exact top-k is then found."""
    order = np.argsort(-doc_norms)
    bound = doc_norms[order] * query_norm
    best: list[float] = []
    for i, score in enumerate(scores[order]):
        if len(best) < TOP_K:
            heapq.heappush(best, float(score))
        elif score > best[0]:
            heapq.heapreplace(best, float(score))
        if len(best) == TOP_K and (i + 1 == len(order) or bound[i + 1] < best[0]):
            return (i + 1) / len(order)
    return 1.0


def whitening(ctx, damping: float) -> dict:
    """{module: (Q_S, Q_A, sqrt(Λ + λ))} of the fitted EK-FAC factors, float32: the eigenbasis rotation of Eq. (W)."""
    factors = load_factors(ctx.paths.factors, None)
    out = {}
    for name in ctx.tracked:
        f = factors[name]
        lam = factors.eigenvalues(name, ctx.cfg.factors.strategy)
        out[name] = (f.q_s.float(), f.q_a.float(), (lam.float() + damping).sqrt())
    return out


def frontier(ctx, direction_sets: dict, damping: float, num_rows: int) -> dict:
    """One pass over the corpus, per document (indexed by doc_id, < num_rows): the exact scores ⟨G, X_q⟩ of every direction set, and the
    scores of each retrieval variant, then the two-stage recall of the exact top-10 against the shortlist fraction.

    Variants (per module, k x k, the store's orthogonal projections of seed projection.seed):
      plain     ⟨P_out G P_inᵀ, P_out X P_inᵀ⟩                          (what `dastra index` stores)
      whitened  ⟨P_out U P_inᵀ, P_out V P_inᵀ⟩ with U = (Q_Sᵀ G Q_A) / sqrt(Λ+λ), V = sqrt(Λ+λ) ⊙ (Q_Sᵀ X Q_A)   (W)
                so that ⟨U, V⟩ = ⟨G, X⟩ exactly (the rotation is orthogonal), for EK-FAC and ASTRA directions alike
    Norm bound: |⟨G, X⟩| = |⟨U, V⟩| ≤ ‖U‖ ‖V‖ (Cauchy-Schwarz), with ‖U_doc‖ ≤ Σ over its sequences ‖U_seq‖; re-scoring
    documents in decreasing ‖U‖ and stopping when ‖U‖ ‖V‖ < the k-th exact score found returns the exact top-k.
    """
    compute = product_dtype(ctx.model, ctx.stat_dtype)
    white = whitening(ctx, damping)
    shapes = {n: tm.shape for n, tm in ctx.tracked.items()}
    projections = {k: KroneckerProjection.for_modules(shapes, k, k, None, ctx.cfg.projection.seed) for k in CURVE_DIMS}
    rotated = {}  # set -> {module: V [Q, O, I]}
    for kind, dirs in direction_sets.items():
        rotated[kind] = {n: w[2] * (w[0].t() @ dirs[n].float() @ w[1]) for n, w in white.items()}
    queries = {}
    for k, projection in projections.items():
        for kind, dirs in direction_sets.items():
            queries[(kind, "plain", k)] = projection.project_matrices({n: x.float() for n, x in dirs.items()})
            if kind != "gradsim":
                queries[(kind, "whitened", k)] = projection.project_matrices(rotated[kind])
    num_queries = next(iter(next(iter(direction_sets.values())).values())).shape[0]
    exact = {kind: torch.zeros(num_rows, num_queries, dtype=torch.float64) for kind in direction_sets}
    projected = {key: torch.zeros(num_rows, num_queries, dtype=torch.float64) for key in queries}
    norms = torch.zeros(num_rows, dtype=torch.float64)  # Σ_seq ‖U_seq‖ per document
    plain_norms = torch.zeros(num_rows, dtype=torch.float64)  # Σ_seq ‖G_seq‖
    start = time.perf_counter()
    for batch, capture in captured_batches(ctx.model, ctx.tracked, ctx.training_batches(ctx.cfg.scoring.batch_size), compute):
        rows = batch["doc_id"]
        grads, acts = capture.output_grads, capture.activations
        full = {n: torch.einsum("bto,bti->boi", grads[n].float(), acts[n].float()) for n in ctx.tracked}
        whitened = {n: (w[0].t() @ full[n] @ w[1]) / w[2] for n, w in white.items()}
        norms.index_add_(0, rows, torch.sqrt(sum((u ** 2).sum((1, 2)) for u in whitened.values())).double())
        plain_norms.index_add_(0, rows, torch.sqrt(sum((g ** 2).sum((1, 2)) for g in full.values())).double())
        for kind, dirs in direction_sets.items():
            exact[kind].index_add_(0, rows, sum(torch.einsum("boi,qoi->bq", full[n], dirs[n].float()) for n in full).double())
        for k, projection in projections.items():
            vectors = projection.project_tokens(grads, acts)
            white_vectors = torch.cat([(m.out_matrix @ whitened[n] @ m.in_matrix.t()).flatten(1)
                                       for n, m in projection.modules.items()], dim=1)
            for (kind, variant, dim), q in queries.items():
                if dim == k:
                    v = vectors if variant == "plain" else white_vectors
                    projected[(kind, variant, k)].index_add_(0, rows, (v @ q.t()).double())
    seconds = time.perf_counter() - start
    present = torch.zeros(num_rows, dtype=torch.bool)
    present[exact[next(iter(exact))].abs().sum(1) > 0] = True
    n = int(present.sum())
    rows_out = []
    for (kind, variant, k), p in projected.items():
        e, pk = exact[kind][present].numpy(), p[present].numpy()
        top = np.argsort(-e, axis=0)[:TOP_K]
        order = np.argsort(-pk, axis=0)
        rho = [spearmanr(e[:, q], pk[:, q]).statistic for q in range(num_queries)]
        row = {"directions": kind, "variant": variant, "dims": f"{k}x{k}", "total_dim": projections[k].dim,
               "spearman_median": float(np.median(rho))}
        for fraction in SHORTLIST_FRACTIONS:
            shortlist = order[: max(TOP_K, int(np.ceil(fraction * n)))]
            row[f"recall_at_{fraction}"] = float(np.mean([len(set(top[:, q]) & set(shortlist[:, q])) / TOP_K for q in range(num_queries)]))
        rows_out.append(row)
        log(json.dumps(row))
    bounds = []
    for kind, dirs in direction_sets.items():
        e = exact[kind][present].numpy()
        sides = {"plain": (plain_norms, {m: x.float() for m, x in dirs.items()})}
        if kind != "gradsim":
            sides["whitened"] = (norms, rotated[kind])
        for name, (doc_norms, query_side) in sides.items():
            query_norms = torch.sqrt(sum((x ** 2).sum((1, 2)) for x in query_side.values())).numpy()
            fractions = [norm_bound_fraction(e[:, q], doc_norms[present].numpy(), query_norms[q]) for q in range(num_queries)]
            bounds.append({"directions": kind, "bound": name, "fraction_rescored_median": float(np.median(fractions)),
                           "fraction_rescored_min": float(np.min(fractions)), "fraction_rescored_max": float(np.max(fractions))})
            log(json.dumps(bounds[-1]))
    return {"rows": rows_out, "bounds": bounds, "full_dim": sum(o * i for o, i in shapes.values()), "seconds": seconds,
            "num_documents": n, "exact": {kind: e[present].numpy() for kind, e in exact.items()},
            "exact_rows": np.flatnonzero(present.numpy())}


def calibration_queries(ctx, store) -> tuple:
    """What `dastra index` calibrates the IVF probing on: EK-FAC-preconditioned sampled training gradients."""
    positions = sample_positions(store.num_documents, CALIBRATION_QUERIES, seed=0)
    vectors, _ = preconditioned_queries(ctx, stages.run_projection(ctx), stages.store_ids(store)[1][positions].tolist())
    return positions, vectors


def ivf_sweep(store, ivf_cfg, queries: np.ndarray, flat_top: np.ndarray, seconds: dict, calibration) -> dict:
    """Build the IVF kind of `ivf_cfg` on the store (probing calibrated as `dastra index` does); recall@10 against
    flat and search time over a few nprobe, and the nprobe a calibration on the stored vectors would choose."""
    kind = ivf_cfg.kind
    t0 = time.perf_counter()
    index, info = build_index(store, ivf_cfg, calibration)
    seconds[f"{kind}_build"] = time.perf_counter() - t0
    stored = calibrate_nprobe(index, store, calibration_target(ivf_cfg.target_recall))
    info["calibrated_nprobe_stored_vectors"] = stored["calibrated_nprobe"]
    nlist, default_nprobe = int(info["nlist"]), int(info["nprobe"])  # the calibrated probing, with its floor
    sweep = []
    probes = {max(1, nlist // 8), max(1, nlist // 4), int(info["calibrated_nprobe"]), default_nprobe, nlist,
              int(info["calibrated_nprobe_stored_vectors"])}
    for nprobe in sorted(probes):
        faiss.extract_index_ivf(index).nprobe = nprobe
        t0 = time.perf_counter()
        _, positions = search_index(index, queries, TOP_K)
        elapsed = time.perf_counter() - t0
        hits = [len(set(positions[q]) & set(flat_top[q])) / TOP_K for q in range(len(queries))]
        sweep.append({"nprobe": nprobe, "recall": float(np.mean(hits)), "seconds": elapsed})
        log(f"{kind} {sweep[-1]} {info}")
    default = next(r for r in sweep if r["nprobe"] == default_nprobe)
    calibrated = next(r for r in sweep if r["nprobe"] == info["calibrated_nprobe"])
    info["recall_at_stored_vector_calibration"] = next(
        r["recall"] for r in sweep if r["nprobe"] == info["calibrated_nprobe_stored_vectors"])
    seconds[f"{kind}_search"] = default["seconds"]
    info["nprobe_sweep"] = sweep
    return {"info": info, "recall": default["recall"], "recall_calibrated_only": calibrated["recall"]}


def bench_config(run_dir: Path, quick: bool, model: str | None, seed: int = 0, solver: str = "ekfac"):
    overrides = [
        f"output.run_dir={run_dir}",
        f"data.num_stdlib_docs={1500 if quick else 4000}",
        f"data.num_facts={8 if quick else 40}",
        "data.shard_rows=1024",
        "factors.max_sequences=2048",
        "scoring.batch_size=64",
        f"scoring.top_k={TOP_K}",
        "scoring.dense=true",
        "index.kind=flat",
        f"solver.name={solver}",
        "tracking.wandb_mode=disabled",
        f"model.tiny.seed={seed}",
    ]
    if model is not None:
        overrides += ["model.source=path", f"model.path={model}"]
    elif quick:
        overrides.append("model.tiny.train_steps=200")
    return load_config(None, overrides)


def prepared(cfg, seconds: dict, prefix: str = "") -> object:
    """The context with factors, query gradients and solved directions (factors reused on a rerun)."""
    t0 = time.perf_counter()
    ctx = context.open_context(cfg, "bench")
    seconds[prefix + "prepare"] = time.perf_counter() - t0
    for name, stage in (("fit", pipeline.fit), ("query", pipeline.query), ("solve", pipeline.solve)):
        t0 = time.perf_counter()
        if name == "fit" and factors_reusable(ctx):
            continue
        stage(ctx)
        seconds[prefix + name] = time.perf_counter() - t0
        log(f"{prefix}{name}: {seconds[prefix + name]:.1f} s")
    return ctx


def search_agreement(ctx, exact_top: dict, query_ids: list) -> dict:
    """`pipeline.search` (shortlist, exact re-score, top-10) against the exhaustive exact top-10, and the recall it
    estimated itself (search/meta.json) next to that true recall."""
    t0 = time.perf_counter()
    rows = pipeline.search(ctx).to_pylist()
    elapsed = time.perf_counter() - t0
    meta = json.loads((stages.search_dir(ctx) / "meta.json").read_text())
    per_query = [len({r["doc_id"] for r in rows if r["query_id"] == qid} & exact_top[qid]) / TOP_K for qid in query_ids]
    return {"agreement": float(np.mean(per_query)), "recall_estimate": meta["recall_estimate"],
            "recall_estimate_stderr": meta["recall_estimate_stderr"],
            "recall_sample_documents": meta["recall_sample_documents"], "seconds": elapsed}


def other_seed_ivf(run_dir: Path, quick: bool, seed: int, seconds: dict) -> dict:
    """A demo model of another seed: its store (default projection), IVF-Flat and IVF-PQ recall@10 against flat for
    its own EK-FAC query directions at the calibrated default probing."""
    cfg = bench_config(run_dir, quick, None, seed)
    ctx = prepared(cfg, seconds, f"seed{seed}_")
    try:
        t0 = time.perf_counter()
        pipeline.index(ctx)
        seconds[f"seed{seed}_index"] = time.perf_counter() - t0
        projection = stages.run_projection(ctx)
        store = open_store(stages.store_dir(ctx), stages.expected_meta(ctx, projection))
        _, tensors = context.load_directions(ctx, "ekfac")
        queries = projection.project_matrices({n: x.float() for n, x in tensors.items()}).numpy()
        _, flat_positions = search_index(load_index(stages.index_dir(ctx), cfg.index), queries, TOP_K)
        result = {"seed": seed}
        calibration = calibration_queries(ctx, store)
        for kind in ("ivfpq", "ivfflat"):
            sweep = ivf_sweep(store, cfg.index.model_copy(update={"kind": kind}), queries, flat_positions, {}, calibration)
            result[kind] = {"recall": sweep["recall"], "recall_calibrated_only": sweep["recall_calibrated_only"],
                            "nprobe": sweep["info"]["nprobe"], "calibrated_nprobe": sweep["info"]["calibrated_nprobe"],
                            "nlist": sweep["info"]["nlist"],
                            "calibration_recall": sweep["info"]["calibration"]["recall_at_k"],
                            "stored_vector_nprobe": sweep["info"]["calibrated_nprobe_stored_vectors"],
                            "stored_vector_recall": sweep["info"]["recall_at_stored_vector_calibration"]}
        log(json.dumps(result))
        return result
    finally:
        ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", help="a trained model folder (e.g. runs/demo/model); default: train the tiny GPT-2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console.quiet = True
    root = Path("/tmp/bench_retrieval") if args.quick else ROOT / "runs" / "bench-retrieval"
    out = Path("/tmp/retrieval.md") if args.quick else ROOT / "docs" / "results" / "retrieval.md"
    cfg = bench_config(root, args.quick, args.model)
    seconds: dict[str, float] = {}
    ctx = prepared(cfg, seconds)
    astra_ctx = prepared(bench_config(root, args.quick, args.model, solver="astra"), seconds, "astra_")
    try:
        shutil.rmtree(ctx.paths.scores, ignore_errors=True)  # the exact pass is timed: never resumed from a rerun
        t0 = time.perf_counter()
        pipeline.score(ctx)
        seconds["exact_streaming_score"] = time.perf_counter() - t0
        log(f"exact streaming score: {seconds['exact_streaming_score']:.1f} s")
        dense = pq.read_table(ctx.paths.root / "scores" / "dense.parquet")
        doc_ids = dense.column("doc_id").to_numpy()
        query_ids, tensors = context.load_directions(ctx, "ekfac")
        exact = np.stack([dense.column(f"q{q}").to_numpy() for q in query_ids], axis=1)  # [N, Q]
        exact_top = doc_ids[np.argsort(-exact, axis=0)[:TOP_K]]  # [k, Q]

        t0 = time.perf_counter()
        index_info = pipeline.index(ctx)
        seconds["index"] = time.perf_counter() - t0
        log(f"index: {seconds['index']:.1f} s {index_info}")

        projection = stages.run_projection(ctx)
        store = open_store(stages.store_dir(ctx), stages.expected_meta(ctx, projection))
        t0 = time.perf_counter()
        queries = projection.project_matrices({n: x.float() for n, x in tensors.items()}).numpy()
        seconds["project_queries"] = time.perf_counter() - t0
        flat = load_index(stages.index_dir(ctx), cfg.index)
        t0 = time.perf_counter()
        _, flat_positions = search_index(flat, queries, TOP_K * cfg.index.shortlist_factor)
        seconds["flat_search"] = time.perf_counter() - t0
        ivf = {}  # kind -> build info with its nprobe sweep; recall and time at the default (calibrated) nprobe
        calibration = calibration_queries(ctx, store)
        for kind in ("ivfpq", "ivfflat"):
            ivf[kind] = ivf_sweep(store, cfg.index.model_copy(update={"kind": kind}), queries, flat_positions[:, :TOP_K],
                                  seconds, calibration)

        two_stage = {"ekfac": search_agreement(ctx, {qid: set(exact_top[:, q].tolist()) for q, qid in enumerate(query_ids)}, query_ids)}
        seconds["search_stage_with_rescore"] = two_stage["ekfac"]["seconds"]
        store_ids = stages.store_ids(store)[0]
        shortlist_union = len({int(store_ids[p]) for p in flat_positions.flatten() if p >= 0})
        log(f"two-stage {two_stage['ekfac']}, shortlist union {shortlist_union}")

        damping = float(json.loads((ctx.paths.ihvp("ekfac") / "meta.json").read_text())["damping"])
        d_eff, _ = effective_dimension(ctx, damping)
        _, query_grads = context.load_query_gradients(ctx)
        _, astra = context.load_directions(ctx, "astra")
        t0 = time.perf_counter()
        num_rows = int(doc_ids.max()) + 1
        curve_result = frontier(ctx, {"ekfac": tensors, "astra": astra, "gradsim": query_grads}, damping, num_rows)
        seconds["frontier_pass"] = time.perf_counter() - t0
        frontier_exact, frontier_rows = curve_result.pop("exact"), curve_result.pop("exact_rows")
        dense_by_doc = dict(zip(doc_ids.tolist(), exact))
        check = np.stack([dense_by_doc[int(d)] for d in frontier_rows])
        seconds["frontier_exact_vs_dense_max_rel"] = float(np.abs(frontier_exact["ekfac"] - check).max() / np.abs(check).max())
        astra_top = np.argsort(-frontier_exact["astra"], axis=0)[:TOP_K]
        astra_exact = {qid: {int(frontier_rows[i]) for i in astra_top[:, q]} for q, qid in enumerate(query_ids)}
        two_stage["astra"] = search_agreement(astra_ctx, astra_exact, query_ids)
        log(f"two-stage astra {two_stage['astra']}")
    finally:
        astra_ctx.close()
        ctx.close()
    seeds = [other_seed_ivf(ROOT / "runs" / f"bench-retrieval-seed{seed}" if not args.quick else Path(f"/tmp/bench_retrieval-seed{seed}"),
                            args.quick, seed, seconds) for seed in IVF_SEEDS] if args.model is None else []

    search_seconds = seconds["project_queries"] + seconds["flat_search"]
    speedup = seconds["exact_streaming_score"] / search_seconds
    speedup_ivf = seconds["exact_streaming_score"] / (seconds["project_queries"] + seconds["ivfpq_search"])
    speedup_ivfflat = seconds["exact_streaming_score"] / (seconds["project_queries"] + seconds["ivfflat_search"])
    speedup_two_stage = seconds["exact_streaming_score"] / seconds["search_stage_with_rescore"]
    default_row = next(r for r in curve_result["rows"] if (r["directions"], r["variant"], r["dims"]) == ("ekfac", "plain", "16x16"))
    ivf_stores = [{"seed": 0, **{k: {"recall": ivf[k]["recall"], "recall_calibrated_only": ivf[k]["recall_calibrated_only"],
                                     "nprobe": ivf[k]["info"]["nprobe"], "calibrated_nprobe": ivf[k]["info"]["calibrated_nprobe"],
                                     "nlist": ivf[k]["info"]["nlist"],
                                     "calibration_recall": ivf[k]["info"]["calibration"]["recall_at_k"],
                                     "stored_vector_nprobe": ivf[k]["info"]["calibrated_nprobe_stored_vectors"],
                                     "stored_vector_recall": ivf[k]["info"]["recall_at_stored_vector_calibration"]}
                                 for k in ivf}}, *seeds]
    best = frontier_best(curve_result["rows"])
    summary = {
        "num_documents": int(len(doc_ids)),
        "num_queries": len(query_ids),
        "projected_dim": store.dim,
        "full_dim": curve_result["full_dim"],
        "damping": damping,
        "effective_dimension": d_eff,
        "ivfpq_recall_at_10_vs_flat": ivf["ivfpq"]["recall"],
        "ivfflat_recall_at_10_vs_flat": ivf["ivfflat"]["recall"],
        "ivf_stores": ivf_stores,
        "speedup_flat_search_vs_exact": speedup,
        "speedup_ivfpq_search_vs_exact": speedup_ivf,
        "speedup_ivfflat_search_vs_exact": speedup_ivfflat,
        "speedup_search_stage_with_rescore_vs_exact": speedup_two_stage,
        "two_stage": two_stage,
        "two_stage_agreement_top10": two_stage["ekfac"]["agreement"],
        "shortlist_union_documents": shortlist_union,
        "spearman_default_dim_ekfac": default_row["spearman_median"],
        "frontier_best_at_5_percent": best,
        "targets": {
            "ivf_recall_all_stores": all(s[k]["recall"] >= 0.95 for s in ivf_stores for k in ("ivfflat", "ivfpq")),
            "speedup": speedup >= 20,
            "two_stage_0.9_at_5_percent": all(best[d]["recall_at_0.05"] >= 0.9 for d in ("ekfac", "astra")),
        },
        "seconds": seconds,
        "frontier": curve_result["rows"],
        "norm_bounds": curve_result["bounds"],
        "ivfpq": ivf["ivfpq"]["info"],
        "ivfflat": ivf["ivfflat"]["info"],
    }
    write_markdown(out, summary, cfg)
    print(json.dumps(summary))


def frontier_best(rows: list[dict]) -> dict:
    """Per direction set, the frontier row with the highest two-stage recall at 5% of the corpus re-scored."""
    best = {}
    for kind in ("ekfac", "astra", "gradsim"):
        candidates = [r for r in rows if r["directions"] == kind]
        best[kind] = max(candidates, key=lambda r: r["recall_at_0.05"])
    return best


def write_markdown(path: Path, s: dict, cfg) -> None:
    sec = s["seconds"]
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    ts = s["two_stage"]
    model = "model " + cfg.model.path if cfg.model.source == "path" else "trained in the run directory, seed 0"
    lines = [
        "# Retrieval: projected gradient store + faiss against exhaustive exact scoring",
        "",
        f"Generated by `python benchmarks/bench_retrieval.py` on {datetime.now().strftime('%Y-%m-%d %H:%M')}. "
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared; torch 1 thread.",
        "",
        f"Workload: the demo tiny GPT-2 (n_embd 128, 2 layers, 8 tracked modules, {s['full_dim']:,} gradient entries "
        f"per document; {model}), {s['num_documents']:,} demo documents (stdlib text + planted facts), "
        f"{s['num_queries']} fact queries solved with EK-FAC and with ASTRA at the auto damping λ = {s['damping']:.4g} "
        f"(factors from 2048 sequences). Projection {cfg.projection.out_dim} x {cfg.projection.in_dim} per module "
        f"(D = {s['projected_dim']:,}), float16 store, top-{TOP_K}, shortlist factor {cfg.index.shortlist_factor}.",
        "",
        "| measure | value | target | met |",
        "|---|---:|---:|---|",
    ]
    for store in s["ivf_stores"]:
        for kind in ("ivfflat", "ivfpq"):
            r = store[kind]
            lines.append(
                f"| {kind} recall@10 against flat, demo model seed {store['seed']}, default (calibrated) probing "
                f"{r['nprobe']} of {r['nlist']} lists (calibrated {r['calibrated_nprobe']}: build-time recall "
                f"{r['calibration_recall']:.3f}, these queries {r['recall_calibrated_only']:.3f}; calibrated on the "
                f"stored vectors instead: {r['stored_vector_nprobe']} lists, these queries {r['stored_vector_recall']:.3f}) "
                f"| {r['recall']:.3f} "
                f"| ≥ 0.95 | {yes(r['recall'] >= 0.95)} |")
    lines += [
        f"| exact streaming scoring / (query projection + flat search) | {s['speedup_flat_search_vs_exact']:.0f}x | ≥ 20x | {yes(s['targets']['speedup'])} |",
        f"| exact streaming scoring / (query projection + IVF-PQ search) | {s['speedup_ivfpq_search_vs_exact']:.0f}x | (info) | |",
        f"| exact streaming scoring / (query projection + IVF-Flat search) | {s['speedup_ivfflat_search_vs_exact']:.0f}x | (info) | |",
        f"| exact streaming scoring / whole `search` stage with exact re-score (EK-FAC) | {s['speedup_search_stage_with_rescore_vs_exact']:.1f}x | (info) | |",
    ]
    for kind in ("ekfac", "astra"):
        r = ts[kind]
        lines.append(
            f"| `dastra search` ({kind}) top-10 agreeing with exhaustive exact top-10 / its own recall estimate "
            f"(± bootstrap s.e., {r['recall_sample_documents']} sampled documents) | {r['agreement']:.3f} / "
            f"{r['recall_estimate']:.3f} ± {r['recall_estimate_stderr']:.3f} | estimate within 0.1 | "
            f"{yes(abs(r['agreement'] - r['recall_estimate']) <= 0.1)} |")
    for kind in ("ekfac", "astra"):
        b = s["frontier_best_at_5_percent"][kind]
        lines.append(
            f"| best two-stage recall of the exact top-10 at 5% re-scored, {kind} ({b['variant']} {b['dims']}) | "
            f"{b['recall_at_0.05']:.3f} | ≥ 0.90 | {yes(b['recall_at_0.05'] >= 0.9)} |")
    lines += [
        f"| Spearman projected vs exact, EK-FAC directions, default dimension (median over queries) | {s['spearman_default_dim_ekfac']:.3f} | (info) | |",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items()) + ".",
        f"The search stage re-scored {s['shortlist_union_documents']:,} distinct shortlist documents (the union of the "
        "queries' shortlists) plus its recall sample.",
        f"IVF-PQ: {json.dumps(s['ivfpq'])}.",
        f"IVF-Flat: {json.dumps(s['ivfflat'])}.",
        "",
        "## The frontier: two-stage recall of the exhaustive exact top-10 against the fraction re-scored",
        "",
        "One pass over the corpus with full per-sequence gradients G (per document: the sum over its sequences). "
        "'recall at f' = fraction of the exact top-10 found in the variant's top ⌈f N⌉, which is exactly the "
        "agreement of the two-stage result when that shortlist is re-scored exactly. plain: P_out G P_inᵀ against "
        "P_out X P_inᵀ (the store); whitened: both sides in the EK-FAC eigenbasis, U = (Q_Sᵀ G Q_A) / sqrt(Λ+λ) and "
        "V = sqrt(Λ+λ) ⊙ (Q_Sᵀ X Q_A), then the same projection (⟨U, V⟩ = ⟨G, X⟩ exactly). gradsim: the raw query "
        f"gradients (the large-damping limit), for reference. Pass: {sec['frontier_pass']:.0f} s.",
        "",
        "| directions | variant | k_out x k_in | total D | Spearman median | "
        + " | ".join(f"recall at {f:g}" for f in SHORTLIST_FRACTIONS) + " |",
        "|---|---|---|---:|---:|" + "---:|" * len(SHORTLIST_FRACTIONS),
    ]
    for r in s["frontier"]:
        lines.append(
            f"| {r['directions']} | {r['variant']} | {r['dims']} | {r['total_dim']:,} | {r['spearman_median']:.3f} | "
            + " | ".join(f"{r[f'recall_at_{f}']:.3f}" for f in SHORTLIST_FRACTIONS) + " |")
    lines += [
        "",
        "## Norm-bound early stopping of the exact re-score",
        "",
        "Documents re-scored exactly in decreasing norm, stopping once the Cauchy-Schwarz bound ‖doc‖ ‖query‖ of every "
        "remaining one is below the k-th exact score found: the result is then the exhaustive exact top-10 (a "
        "guarantee). whitened: ‖U‖ ‖V‖ (the tightest such bound); plain: ‖G‖ ‖X‖. Fraction of the corpus re-scored:",
        "",
        "| directions | bound | median | min | max |",
        "|---|---|---:|---:|---:|",
    ]
    for b in s["norm_bounds"]:
        lines.append(f"| {b['directions']} | {b['bound']} | {b['fraction_rescored_median']:.3f} | "
                     f"{b['fraction_rescored_min']:.3f} | {b['fraction_rescored_max']:.3f} |")
    lines += [
        "",
        "## Why EK-FAC-preconditioned scores need a large projection",
        "",
        f"The effective dimension of the EK-FAC-weighted inner product, d_eff = Σ Λ/(Λ + λ) over the tracked entries, "
        f"is {s['effective_dimension']:,.0f} of {s['full_dim']:,} at the auto damping. Writing the score as "
        "⟨(P+λ)^-1/2 ∇L, (P+λ)^-1/2 ∇f⟩, the training side has E‖u‖² = d_eff, and any k-dimensional linear sketch "
        "of it estimates the score with noise ≈ ‖u‖‖v‖/√k, while the spread of the scores over documents is at most "
        "‖v‖ (Rayleigh quotient ≤ 1). A rank correlation of 0.9 needs a noise/spread ratio below about 0.5, so k of "
        "several times d_eff: far above any useful compression at this damping.",
        "",
    ]
    kept = ""
    if path.is_file() and ANALYSIS_MARKER in path.read_text():
        kept = path.read_text().split(ANALYSIS_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n" + ANALYSIS_MARKER + kept)


if __name__ == "__main__":
    main()
