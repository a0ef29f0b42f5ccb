"""LDS of grad-dot, TracIn, TRAK, EK-FAC-IF, SNI-IF and ASTRA-IF on digits, diabetes and the tiny GPT-2, of
EK-FAC-SOURCE and ASTRA-SOURCE against them in the non-converged regime (digits-short, diabetes-short: 3 epochs),
plus fact tracing on the demo (seeds §9.1, §12.9, §6-7): reproduces docs/results/lds.md.

    python benchmarks/bench_lds.py                 # the full table (≈ 30-40 min on the shared 2-core machine)
    python benchmarks/bench_lds.py --quick         # smoke run into /tmp (small M, R, E)
    python benchmarks/bench_lds.py --tasks digits-short,diabetes-short --no-facts   # only the SOURCE section

Retraining runs as Ray tasks (one CPU each) and everything (retrained models, measurements, scores) is cached
under --cache-dir, so a second run only recomputes what changed (and re-runs fact tracing's solve + score).
Each task's rows replace that task's entry in lds.json and the page is regenerated, so running some --tasks keeps
the other tasks' rows; the run line at the top of the page is only rewritten by a run of every task and the facts.
Prints one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from distributed_astra.config import load_config  # noqa: E402
from distributed_astra.eval.commands import facts_command, lds_command  # noqa: E402
from distributed_astra.eval.results import write_results  # noqa: E402

METHODS = ["graddot", "tracin", "trak", "ekfac", "sni", "astra"]
SOURCE_METHODS = ["graddot", "tracin", "ekfac", "astra", "ekfac-source-lambda", "ekfac-source", "ekfac-source-damped",
                  "astra-source"]
SWEEP = "[0.1,1.0,10.0,100.0]"
# Per task: eval overrides. The LM is ~30x costlier per retraining and per solver iteration: smaller M and R,
# ASTRA/SNI with ℬ = 8 sequences and 100 iterations (×0.5 every 25), λ swept over {1, 10} × mean(Λ) only.
TASKS = {
    "digits": ["eval.num_subsets=100", "eval.num_retrain_seeds=5", f"eval.damping_sweep={SWEEP}"],
    "diabetes": ["eval.num_subsets=100", "eval.num_retrain_seeds=5", f"eval.damping_sweep={SWEEP}"],
    "gpt2": ["eval.num_subsets=30", "eval.num_retrain_seeds=2", "eval.solver.iterations=100",
             "eval.solver.minibatch_size=8", "eval.solver.lr_decay_every=25", "eval.damping_sweep=[1.0,10.0]"],
    "ridge": ["eval.num_subsets=100", "eval.num_retrain_seeds=1", "eval.ensemble_size=1"],  # the harness check
    # SOURCE's non-converged regime (L = source.num_segments, default 3): the harness's settings, no λ sweep
    "digits-short": ["eval.num_subsets=100", "eval.num_retrain_seeds=5"],
    "diabetes-short": ["eval.num_subsets=100", "eval.num_retrain_seeds=5"],
}
QUICK = ["eval.num_subsets=12", "eval.num_retrain_seeds=1", "eval.ensemble_size=2", "eval.solver.iterations=20",
         "eval.damping_sweep=[]"]
# fact tracing's solver: eval.solver, the settings `eval lds` uses too (config.eval_solver)
FACTS = ["eval.solver.iterations=30", "eval.solver.minibatch_size=8", "eval.solver.lr_mode=absolute",
         "eval.solver.lr=0.01", "eval.solver.momentum=0.0", "eval.solver.lr_decay=1.0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small M/R/E, results to /tmp")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--cache-dir", default=None, help="default runs/eval (quick: /tmp/bench_lds/cache)")
    parser.add_argument("--results-dir", default=None, help="default docs/results (quick: /tmp/bench_lds)")
    parser.add_argument("--facts-run-dir", default=None, help="fact-tracing run dir (default runs/eval-facts; quick: /tmp)")
    parser.add_argument("--no-facts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    cache = args.cache_dir or ("/tmp/bench_lds/cache" if args.quick else "runs/eval")
    results = args.results_dir or ("/tmp/bench_lds" if args.quick else "docs/results")
    base = [f"eval.cache_dir={cache}", f"eval.results_dir={results}"]
    summary: dict = {"tasks": {}, "facts": None}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        cfg = load_config(None, base + TASKS[task] + (QUICK if args.quick else []))
        result = lds_command(cfg, task, SOURCE_METHODS if task.endswith("-short") else METHODS)
        summary["tasks"][task] = {
            "single": {r.method: round(r.single_mean, 4) for r in result.rows},
            "ensemble": {r.method: round(r.ensemble_mean, 4) for r in result.rows},
            "sweep": {f"{r.method}@{r.damping_scale:g}": [round(r.single_mean, 4), round(r.ensemble_mean, 4)]
                      for r in result.sweep},
            "retrained_now": result.trained_now, "diverged": result.num_diverged,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    if not args.no_facts:
        t0 = time.perf_counter()
        run_dir = args.facts_run_dir or ("/tmp/bench_lds/facts" if args.quick else "runs/eval-facts")
        facts_overrides = [f"output.run_dir={run_dir}"] + FACTS
        if args.quick:
            facts_overrides += ["data.num_stdlib_docs=200", "data.num_facts=10", "model.tiny.train_steps=200"]
        facts = facts_command(load_config(None, base + facts_overrides), ["graddot", "ekfac", "astra"])
        summary["facts"] = {r["method"]: {k: r[k] for k in ("recall@1", "recall@10", "mrr")} for r in facts["rows"]}
        summary["facts_seconds"] = round(time.perf_counter() - t0, 1)
    wall = time.perf_counter() - start
    if set(args.tasks.split(",")) == set(TASKS) and not args.no_facts:
        command = "python benchmarks/bench_lds.py" + (" --quick" if args.quick else "")
        write_results(Path(results), run_info={
            "command": f"`{command}`", "wall_seconds": f"{wall:.0f} s for the whole script (this run)",
            "settings": "see each task's paragraph; fact tracing: " + " ".join(FACTS),
        })
    summary["wall_seconds"] = round(wall, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
