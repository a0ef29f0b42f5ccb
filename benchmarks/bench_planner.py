"""Planner check: predicted vs measured peak memory of real stage steps on two small GPT-2s on CPU, and the GPT-2 XL
plan written to docs/results/plan_gpt2xl.md.

Each measurement runs in a fresh subprocess (1 torch thread, glibc's mmap threshold fixed at 64 KiB so that freed
buffers leave the resident set at once): it builds the model, notes its RSS, runs ONE step of the stage with the
package's own functions (`collect_covariances`, `captured_batches` + `sequence_scores`, `ihvp.solve` with the exact
GGN product), and reports the peak RSS (`ru_maxrss`). Measured = parameters + (peak RSS - RSS after building the
model). Predicted = the planner's per-GPU memory of that stage for the same config.

    .venv/bin/python benchmarks/bench_planner.py            # prints a final JSON line

One rank and one process here; the same check per rank of a 2-rank gloo group, for the sharded fit and the
modules-mode solve, is benchmarks/bench_planner_ranks.py (docs/results/planner_ranks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
TOLERANCE = 0.20
MODELS = {
    "gpt2-256x4 (V 8192, T 128)": ["model.tiny.n_embd=256", "model.tiny.n_layer=4", "model.tiny.n_head=4",
                                   "model.tiny.vocab_size=8192", "data.max_length=128"],
    "gpt2-384x6 (V 4096, T 64)": ["model.tiny.n_embd=384", "model.tiny.n_layer=6", "model.tiny.n_head=6",
                                  "model.tiny.vocab_size=4096", "data.max_length=64"],
}
COMMON = ["factors.batch_size=16", "scoring.batch_size=16", "solver.name=astra", "solver.query_batch_size=4",
          "solver.minibatch_size=8", "solver.iterations=3", "plan.gpu_memory=16GB", "data.queries=demo"]
STAGES = {"covariances": "covariances", "scoring": "scoring", "astra": "astra chunk (queries)"}

WORKER = r'''
import json, resource, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from distributed_astra.config import load_config
from distributed_astra.plan import shapes
from distributed_astra.models.load import prepare_for_attribution

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

stage, overrides = sys.argv[1], json.loads(sys.argv[2])
cfg = load_config(None, overrides)
hf = shapes.model_config(cfg)
hf._attn_implementation = "eager"
torch.manual_seed(0)
model = prepare_for_attribution(AutoModelForCausalLM.from_config(hf, attn_implementation="eager"))
tracked = shapes.tracked_modules(model, cfg)
T = cfg.data.max_length
def batch(b):
    ids = torch.randint(1, hf.vocab_size, (b, T))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "doc_id": torch.arange(b)}
warm = batch(1)
with torch.no_grad():
    model(input_ids=warm["input_ids"])  # lazy kernels and thread pools, before the baseline
params = sum(p.numel() * p.element_size() for p in model.parameters())
stat = torch.float64
base = rss()
if stage == "covariances":
    from distributed_astra.curvature.covariance import collect_covariances
    collect_covariances(model, tracked, [batch(cfg.factors.batch_size)], stat, torch.Generator().manual_seed(0))
elif stage == "scoring":
    from distributed_astra.scoring.gradients import captured_batches
    from distributed_astra.scoring.inner_products import sequence_scores
    q = cfg.solver.query_batch_size
    directions = {n: torch.randn(q, *t.shape) for n, t in tracked.items()}
    for b, capture in captured_batches(model, tracked, [batch(cfg.scoring.batch_size)], torch.float32):
        sequence_scores(capture.output_grads, capture.activations, directions)
else:
    import itertools
    from distributed_astra.curvature.factors import EkfacFactors, ModuleFactors
    from distributed_astra.ihvp.products import GGNProduct
    from distributed_astra.ihvp.solvers import ekfac_preconditioner, solve
    mods = {}
    for n, t in tracked.items():
        qa = torch.linalg.qr(torch.randn(t.in_dim, t.in_dim, dtype=stat))[0]
        qs = torch.linalg.qr(torch.randn(t.out_features, t.out_features, dtype=stat))[0]
        mods[n] = ModuleFactors(qa, torch.rand(t.in_dim, dtype=stat), qs, torch.rand(t.out_features, dtype=stat),
                                torch.rand(*t.shape, dtype=stat))
    factors = EkfacFactors(mods, 1000, 100, 100)
    q = cfg.solver.query_batch_size
    v = {n: torch.randn(q, *t.shape, dtype=stat) for n, t in tracked.items()}
    pre = ekfac_preconditioner(factors, cfg.solver, 0.1, "ekfac")
    solve(v, pre, GGNProduct(model, tracked), itertools.repeat(batch(cfg.solver.minibatch_size)), cfg.solver, 0.1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": params + peak - base}))
'''


def measure(stage: str, overrides: list[str]) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    # -P: the worker imports the installed package, never a distributed_astra/ that happens to be in the cwd.
    out = subprocess.run([sys.executable, "-P", "-c", WORKER, stage, json.dumps(overrides)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["measured"]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from distributed_astra.config import CONFIGS_DIR, load_config
    from distributed_astra.plan import make_plan
    from distributed_astra.plan.render import plan_markdown

    rows = []
    for model_name, model_overrides in MODELS.items():
        overrides = model_overrides + COMMON
        plan = make_plan(load_config(None, overrides), search=False)
        predicted = {s.stage: s.per_gpu for s in plan.stages}
        for stage, plan_stage in STAGES.items():
            measured = measure(stage, overrides)
            ratio = predicted[plan_stage] / measured
            rows.append({"model": model_name, "stage": stage, "predicted_mib": predicted[plan_stage] / 2**20,
                         "measured_mib": measured / 2**20, "ratio": ratio})
            print(f"{model_name:28s} {stage:12s} predicted {rows[-1]['predicted_mib']:8.1f} MiB  "
                  f"measured {rows[-1]['measured_mib']:8.1f} MiB  ratio {ratio:.3f}", flush=True)

    started = time.perf_counter()
    xl_cfg = load_config(CONFIGS_DIR / "gpt2xl.yaml")
    xl = make_plan(xl_cfg, gpus=8, gpu_memory="80GB")
    xl_seconds = time.perf_counter() - started
    worst = max(abs(r["ratio"] - 1) for r in rows)
    lines = [
        "# Planner: predicted vs measured peak memory, and the GPT-2 XL plan",
        "",
        "`benchmarks/bench_planner.py`. Predicted: `dastra plan`'s per-GPU memory of the stage (meta-device replay).",
        "Measured: one real step of the stage on CPU in a fresh process (1 thread, `MALLOC_MMAP_THRESHOLD_=65536`):",
        "parameters + (peak RSS - RSS after building the model). Stages: the covariance pass (`collect_covariances`,",
        "one batch), scoring (`captured_batches` + `sequence_scores`), one ASTRA chunk (`ihvp.solve`, exact GGN).",
        "",
        "| model | stage | predicted MiB | measured MiB | predicted / measured |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['stage']} | {r['predicted_mib']:.1f} | {r['measured_mib']:.1f} | {r['ratio']:.3f} |"
              for r in rows]
    lines += [
        "",
        f"Largest deviation: {worst:.1%} (tolerance {TOLERANCE:.0%}).",
        "",
        "## GPT-2 XL: `dastra plan --config configs/gpt2xl.yaml --gpus 8 --gpu-mem 80GB`",
        "",
        f"Computed offline from `configs/models/gpt2-xl.json` (no weights) in {xl_seconds:.0f} s on a loaded 2-core CPU.",
        "",
        plan_markdown(xl),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_gpt2xl.md").write_text("\n".join(lines))
    print(json.dumps({"benchmark": "planner", "max_relative_error": round(worst, 4), "within_tolerance": worst <= TOLERANCE,
                      "rows": rows, "gpt2xl_fits": xl.fits,
                      "gpt2xl_max_query_chunk": xl.max_query_chunk, "gpt2xl_max_micro_batch": xl.max_micro_batch}))


if __name__ == "__main__":
    main()
