"""Planner check at 2 ranks: predicted vs measured per-rank peak memory of the sharded fit and the modules-mode
ASTRA solve on CPU; writes docs/results/planner_ranks.md and prints one final JSON line.

Two processes (`torch.multiprocessing`, a gloo group of world size 2, one torch thread each) build gpu_check's
small GPT-2 (`SHAPES["cpu"]`, every other block's c_fc tracked, the same seed on both ranks) and run, as
`execution.Rank(r, 2, ...)`, the package's own rank functions: `stages.fit.rank_fit` (each module's A/S sums and
eigenbasis on its owner, `ownership.run_owners`), `stages.query.rank_query` (each rank forms its modules' query
gradients) and `stages.solve.rank_solve` in `ray.solve_mode: modules` (each rank holds its modules' factors, v, x
and momentum; the exact GGN product with the logit tangents summed over ranks). Measured, per rank: the model plus
the high-water mark of the tensor storages the phase allocates (`plan.simulate.LiveBytes`, through gpu_check's
`peak_memory`), with the phase's inputs (the solve's own factors and query gradients) counted as resident.
Predicted: `plan.make_plan` of the same config at `plan.gpus=2`: the fit's stages' maximum and the
`astra chunk (modules)` stage, per GPU (the busiest owner). The check: |predicted / measured - 1| <= 20% on every
rank's busiest phase (exit status 1 when not; tests/test_planner_ranks.py runs it).

    .venv/bin/python benchmarks/bench_planner_ranks.py      # about 20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gpu_check import (  # noqa: E402  (this script's folder is on sys.path)
    FIT_STAGES,
    SHAPES,
    TOKENIZER_VOCAB,
    TRACKED,
    build_model,
    free_port,
    gpt2_config,
    peak_memory,
    write_corpus,
)
from safetensors.torch import load_file

from distributed_astra.artifacts import atomic_path, rank_file
from distributed_astra.config import load_config
from distributed_astra.context import QUERY_GRADIENTS_STEM
from distributed_astra.curvature.factors import EkfacFactors, load_factor_shard, shard_file
from distributed_astra.data.tokenizer import train_bpe_tokenizer
from distributed_astra.execution import Rank
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.plan import make_plan
from distributed_astra.stages.fit import rank_fit
from distributed_astra.stages.query import rank_query
from distributed_astra.stages.solve import rank_solve

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "planner_ranks.md"
WORLD = 2
TOLERANCE = 0.20
SHAPE = SHAPES["cpu"]
DAMPING = 1e-3  # the solve's λ: memory does not depend on it
SOLVE_STAGE = "astra chunk (modules)"


def overrides(folder: Path, corpus: Path) -> list[str]:
    """The run: the small shape through plan.hf_config, 2 ranks, modules-mode ASTRA with the exact GGN product."""
    return [
        "model.source=path", f"model.path={folder}", f"model.dtype={SHAPE.dtype}",
        f"model.tracked_modules={json.dumps(TRACKED)}", f"data.corpus={corpus}",
        f"data.queries={folder / 'queries.parquet'}",
        f"data.max_length={SHAPE.seq_len}", f"factors.batch_size={SHAPE.fit_batch}",
        f"factors.max_sequences={SHAPE.fit_sequences}", "solver.name=astra", "solver.product=ggn",
        "solver.iterations=3", "solver.heldout_every=0", f"solver.minibatch_size={SHAPE.minibatch}",
        "solver.query_batch_size=4", f"ray.num_workers={WORLD}", "ray.solve_mode=modules", "deepspeed.stage=0",
        f"plan.hf_config={folder / 'config.json'}", f"plan.gpus={WORLD}", "plan.gpu_memory=64GB",
        "plan.memory_reserve=0", f"plan.documents={SHAPE.fit_sequences}",
    ]


def worker(rank_index: int, port: int, folder: str, corpus: str) -> None:
    """One rank: fit, query gradients, solve; its peaks written to <folder>/rank-<r>.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_index, world_size=WORLD)
    root = Path(folder)
    cfg = load_config(None, overrides(root, Path(corpus)))
    model = build_model(SHAPE, torch.device("cpu"))
    tracked = select_tracked_modules(model, TRACKED)
    tokenizer = train_bpe_tokenizer(pq.read_table(corpus).column("text").to_pylist(),
                                    min(TOKENIZER_VOCAB, SHAPE.vocab_size), root / f"tokenizer-{rank_index}")
    rank = Rank(rank_index, WORLD, cfg, model, tracked, tokenizer)
    factors_dir, queries_dir = root / "factors", root / "queries"  # the driver's folders, made by the parent
    with peak_memory(torch.device("cpu"), model) as fit_peak:
        out = rank_fit(rank, corpus, str(factors_dir))
    num_tokens, num_sequences, num_lambda = out["counts"]
    factors = EkfacFactors(load_factor_shard(factors_dir / shard_file(rank_index)), num_tokens, num_sequences,
                           num_lambda)
    rank_query(rank, str(root / "queries.parquet"), str(queries_dir))
    grads = load_file(str(queries_dir / rank_file(QUERY_GRADIENTS_STEM, rank_index)))
    with peak_memory(torch.device("cpu"), model, factors, grads) as solve_peak:
        rank_solve(rank, corpus, factors, grads, DAMPING, "modules")
    (root / f"rank-{rank_index}.json").write_text(json.dumps({
        "fit": fit_peak["bytes"], "solve": solve_peak["bytes"], "modules": sorted(factors.names),
    }))
    dist.destroy_process_group()


def write_queries(folder: Path, count: int) -> None:
    """`count` queries of random words (prompt and completion) from the corpus's generator."""
    words = pq.read_table(folder / "corpus.parquet").column("text").to_pylist()[0].split()
    rows = [{"query_id": f"q{i}", "prompt": " ".join(words[3 * i : 3 * i + 3]), "completion": " " + words[3 * i + 3]}
            for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "queries.parquet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="the Markdown report")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="planner_ranks-") as scratch:
        folder = Path(scratch)
        corpus = write_corpus(folder, SHAPE, seed=0)
        write_queries(folder, 8)
        for name in ("factors", "queries"):
            (folder / name).mkdir()
        gpt2_config(SHAPE).to_json_file(folder / "config.json")
        cfg = load_config(None, overrides(folder, corpus))
        plan = make_plan(cfg, search=False)
        by_stage = {s.stage: s.per_gpu for s in plan.stages}
        predicted = {"fit": max(by_stage[s] for s in FIT_STAGES), "solve": by_stage[SOLVE_STAGE]}
        mp.spawn(worker, args=(free_port(), str(folder), str(corpus)), nprocs=WORLD, join=True)
        ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    rows = []
    for phase in ("fit", "solve"):
        busiest = max(r[phase] for r in ranks)
        rows.append({"phase": phase, "predicted": predicted[phase], "measured": [r[phase] for r in ranks],
                     "ratio": predicted[phase] / busiest})
    worst = max(abs(r["ratio"] - 1) for r in rows)
    mib = 2**20
    lines = [
        "# Planner at 2 ranks: predicted vs measured per-rank peak memory",
        "",
        f"`.venv/bin/python benchmarks/bench_planner_ranks.py` on {time.strftime('%Y-%m-%d %H:%M')} (what runs and "
        "how it is measured: its docstring). Model: gpu_check's small GPT-2 (n_layer "
        f"{SHAPE.n_layer}, n_embd {SHAPE.n_embd}, vocab {SHAPE.vocab_size}, {SHAPE.seq_len} tokens, float32), "
        f"tracked {', '.join(TRACKED)}; modules per rank: "
        + "; ".join(f"rank {i}: {len(r['modules'])}" for i, r in enumerate(ranks)) + ".",
        "",
        "| phase | predicted per GPU (MiB) | measured rank 0 (MiB) | measured rank 1 (MiB) | predicted / busiest |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['phase']} | {r['predicted'] / mib:.2f} | {r['measured'][0] / mib:.2f} | "
          f"{r['measured'][1] / mib:.2f} | {r['ratio']:.3f} |" for r in rows),
        "",
        f"Largest deviation: {worst:.1%} (tolerance {TOLERANCE:.0%}); {time.perf_counter() - started:.0f} s.",
        "",
    ]
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print(json.dumps({"benchmark": "planner_ranks", "rows": rows, "max_relative_error": round(worst, 4),
                      "within_tolerance": worst <= TOLERANCE, "report": str(args.out)}))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
