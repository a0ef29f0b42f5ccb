"""docs/results/lds.md, lds.png and lds.json: the LDS tables (one per task), the λ sweep, and fact tracing.

Results accumulate in `lds.json` (one entry per task, plus the fact-tracing table), each run replacing its own
entries, and the Markdown page and bar chart are regenerated from all of them. Text below the marker line
`<!-- analysis -->` of an existing lds.md is kept.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from distributed_astra.artifacts import atomic_path, write_json
from distributed_astra.eval.lds import LdsResult, LdsRow

ANALYSIS_MARKER = "<!-- analysis -->"
TASK_ORDER = ["digits", "diabetes", "gpt2", "ridge", "digits-short", "diabetes-short"]
SOURCE_TASKS = ("digits-short", "diabetes-short")  # the non-converged regime: their own section
SOURCE_INTRO = (
    "SOURCE's setting (seeds §6-7, §10.5; FashionMNIST-N / Concrete-N): the digits and diabetes MLPs trained for "
    "**3 epochs** only, one checkpoint per epoch, L = `source.num_segments` segments (3). EK-FAC-SOURCE (exp-form "
    "r̄) and its damped form r̃ use SOURCE's own damping λ_ℓ = 1/(η/(1−μ)·K_ℓ) + weight decay, with the EK-FAC "
    "averaged over each segment's checkpoints; ASTRA-SOURCE solves r̃ per segment with the harness's ASTRA settings "
    "(G̃ at the segment's averaged weights). EK-FAC-IF (SOURCE's λ) is IF at θ^s with Σ_ℓ K_ℓλ_ℓ / Σ_ℓ K_ℓ: it separates "
    "SOURCE's damping from its averaging over the trajectory. The other IF rows use the harness's λ."
)


def load_results(results_dir: Path) -> dict:
    path = Path(results_dir) / "lds.json"
    return json.loads(path.read_text()) if path.is_file() else {"tasks": {}, "facts": None, "runs": {}}


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _table(rows: list[LdsRow], with_damping: bool) -> list[str]:
    head = "| method | λ scale | λ (model 0) | single model | ensemble of E |" if with_damping else (
        "| method | single model | ensemble of E | seconds (E models) |")
    lines = [head, "|---|" + "---|" * (head.count("|") - 2)]
    for r in rows:
        if with_damping:
            lines.append(f"| {r.label} | {r.damping_scale:g} | {{lam}} | {_fmt(r.single_mean, r.single_std)} | "
                         f"{_fmt(r.ensemble_mean, r.ensemble_std)} |")
        else:
            lines.append(f"| {r.label} | {_fmt(r.single_mean, r.single_std)} | "
                         f"{_fmt(r.ensemble_mean, r.ensemble_std)} | {r.seconds:.1f} |")
    return lines


def _task_section(result: LdsResult) -> list[str]:
    s = result.settings
    damping = (f"λ = {s['exact_damping']:g} (exact: the ridge coefficient)" if s["exact_damping"] is not None
               else f"λ = {s['damping_scale']:g} × mean(Λ) of each model")
    lines = [
        f"### {result.task}",
        "",
        f"{result.description}. N = {result.num_train} training examples, Q = {result.num_queries} queries; "
        f"M = {s['M']} subsets at β = {s['beta']}, R = {s['R']} retraining seeds each, E = {s['E']} models; "
        f"IF methods at {damping}. Retraining runs: {result.num_runs}, diverged and left out: "
        f"**{result.num_diverged}** ({result.num_subsets_dropped} subsets dropped); CPU time of the retraining "
        f"{result.retrain_seconds:.0f} s.",
        "",
        *_table(result.rows, with_damping=False),
        "",
    ]
    if len({r.damping_scale for r in result.sweep}) > 1:
        lines += [f"λ sweep ({result.task}):", ""]
        for line in _table(result.sweep, with_damping=True):
            if "{lam}" in line:
                scale = line.split("|")[2].strip()
                line = line.replace("{lam}", f"{result.dampings.get(scale, [float('nan')])[0]:.3g}")
            lines.append(line)
        lines.append("")
    return lines


def _facts_section(facts: dict) -> list[str]:
    lines = [
        "## Fact tracing (demo corpus, tiny GPT-2)",
        "",
        f"`dastra eval facts` on `{facts['config']}`: {facts['num_fact_queries']} fact queries over the demo corpus; "
        "is the planted document of each fact in the query's top-k? (`eval/facts.py`, the pipeline's own "
        "fit/query/solve/score). grad-dot is the pipeline's SNI with 0 iterations (x = ∇f).",
        "",
        "| method | solver settings | recall@1 | recall@10 | MRR | seconds (solve + score) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in facts["rows"]:
        lines.append(f"| {row['label']} | {row['settings']} | {row['recall@1']:.3f} | {row['recall@10']:.3f} | "
                     f"{row['mrr']:.3f} | {row['seconds']:.0f} |")
    return lines + [""]


def _plot(tasks: dict[str, LdsResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t for t in TASK_ORDER if t in tasks] + [t for t in tasks if t not in TASK_ORDER]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = tasks[name].rows
        x = torch.arange(len(rows)).float()
        sem = [r.single_std / max(1, r.num_queries) ** 0.5 for r in rows]  # standard error over queries
        ax.bar(x - 0.2, [r.single_mean for r in rows], 0.4, yerr=sem, label="single model", color="#4c72b0",
               capsize=2)
        sem = [r.ensemble_std / max(1, r.num_queries) ** 0.5 for r in rows]
        ax.bar(x + 0.2, [r.ensemble_mean for r in rows], 0.4, yerr=sem, capsize=2,
               label=f"ensemble of {tasks[name].settings['E']}", color="#dd8452")
        ax.set_xticks(x.tolist(), [r.label for r in rows], rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(name)
        ax.set_ylabel("LDS (Spearman)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(results_dir: Path, result: LdsResult | None = None, facts: dict | None = None,
                  run_info: dict | None = None) -> Path:
    """Merge `result` / `facts` into lds.json, then rewrite lds.md and lds.png from everything stored."""
    results_dir = Path(results_dir)
    data = load_results(results_dir)
    if result is not None:
        data["tasks"][result.task] = result.to_json()
    if facts is not None:
        data["facts"] = facts
    if run_info is not None:
        data["runs"].update(run_info)
    write_json(results_dir / "lds.json", data)
    tasks = {name: LdsResult.from_json(dict(entry)) for name, entry in data["tasks"].items()}
    md_path = results_dir / "lds.md"
    analysis = ""
    if md_path.is_file() and ANALYSIS_MARKER in md_path.read_text():
        analysis = md_path.read_text().split(ANALYSIS_MARKER, 1)[1]
    lines = [
        "# Linear datamodeling score (LDS) and fact tracing",
        "",
        f"Regenerated {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/bench_lds.py` / `dastra eval lds|facts` "
        f"(Python {platform.python_version()}, torch {torch.__version__}, CPU).",
        "",
        "LDS (seeds §9.1): for each query, Spearman's ρ over the M subsets between the predicted group effect "
        "Γ_j = Σ_{z_m ∉ S_j} τ(z_m, z_q) (the sum runs over the REMOVED examples: docs/design.md, \"LDS sign\") and "
        "the measured f after retraining on S_j, averaged over R seeds. Entries are mean ± std over the queries; "
        "single model = each query's LDS averaged over the E models, ensemble = LDS of the scores averaged over "
        "the E models (each with its own factors and iHVPs). Measurements: −margin (digits), |g − t| (diabetes), "
        "summed CE of the query sequence (gpt2), g − t (ridge).",
        "",
    ]
    for key in ("command", "wall_seconds", "settings"):
        if key in data["runs"]:
            lines.append(f"- {key.replace('_', ' ')}: {data['runs'][key]}")
    lines += ["", "![LDS per method](lds.png)", "", "## LDS per task", ""]
    order = [t for t in TASK_ORDER if t in tasks] + [t for t in tasks if t not in TASK_ORDER]
    for name in [t for t in order if t not in SOURCE_TASKS]:
        lines += _task_section(tasks[name])
    if any(t in tasks for t in SOURCE_TASKS):
        lines += ["## SOURCE and ASTRA-SOURCE (non-converged regime)", "", SOURCE_INTRO, ""]
        for name in [t for t in order if t in SOURCE_TASKS]:
            lines += _task_section(tasks[name])
    if data["facts"]:
        lines += _facts_section(data["facts"])
    text = "\n".join(lines) + "\n" + ANALYSIS_MARKER + (analysis if analysis else "\n")
    with atomic_path(md_path) as tmp:
        tmp.write_text(text)
    if tasks:
        _plot(tasks, results_dir / "lds.png")
    return md_path
