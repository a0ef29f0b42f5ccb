"""What `dastra eval lds` and `dastra eval facts` do: run, log to W&B (`tracking.Tracker`), write docs/results."""

from __future__ import annotations

from pathlib import Path

from distributed_astra.config import Config
from distributed_astra.eval.facts import check_fact_methods, trace_facts
from distributed_astra.eval.lds import LdsResult, check_names, run_lds
from distributed_astra.eval.results import write_results
from distributed_astra.progress import console
from distributed_astra.tracking import Tracker


def _print_rows(result: LdsResult) -> None:
    from rich.table import Table

    view = Table(title=f"LDS on {result.task} (mean ± std over {result.num_queries} queries)", title_justify="left")
    for column in ("method", "λ scale", "single model", f"ensemble of {result.settings['E']}", "seconds"):
        view.add_column(column)
    for r in result.sweep if len(result.sweep) > len([r for r in result.rows if r.damping_scale]) else []:
        view.add_row(r.label, f"{r.damping_scale:g}", f"{r.single_mean:.3f} ± {r.single_std:.3f}",
                     f"{r.ensemble_mean:.3f} ± {r.ensemble_std:.3f}", f"{r.seconds:.1f}")
    for r in result.rows:
        scale = "" if r.damping_scale is None else f"{r.damping_scale:g}"
        view.add_row(r.label, scale, f"{r.single_mean:.3f} ± {r.single_std:.3f}",
                     f"{r.ensemble_mean:.3f} ± {r.ensemble_std:.3f}", f"{r.seconds:.1f}")
    console.print(view)
    console.print(f"retraining runs: {result.num_runs} ({result.trained_now} trained now, the rest cached), "
                  f"diverged and left out: {result.num_diverged}")


def lds_command(cfg: Config, task: str, methods: list[str]) -> LdsResult:
    """`dastra eval lds`: the LDS table of one task, written to `eval.results_dir` and logged."""
    check_names(task, methods)
    with Tracker(Path(cfg.eval.cache_dir), cfg.tracking, cfg.model_dump(mode="json"), f"eval-lds-{task}") as tracker:
        result = run_lds(cfg, task, methods, log=tracker.log)
        tracker.summary({f"lds/{task}/{r.method}/ensemble": r.ensemble_mean for r in result.rows}
                        | {f"lds/{task}/{r.method}/single": r.single_mean for r in result.rows}
                        | {f"lds/{task}/num_diverged": result.num_diverged})
    path = write_results(Path(cfg.eval.results_dir), result)
    _print_rows(result)
    console.print(f"results: {path}")
    return result


def facts_command(cfg: Config, methods: list[str]) -> dict:
    """`dastra eval facts`: recall@1/@10 and MRR of the planted documents per method, written and logged."""
    check_fact_methods(methods)
    facts = trace_facts(cfg, methods)
    facts["config"] = f"run dir {cfg.output.run_dir}"
    path = write_results(Path(cfg.eval.results_dir), facts=facts)
    for row in facts["rows"]:
        console.print(f"{row['label']:>10}: recall@1 {row['recall@1']:.3f}  recall@10 {row['recall@10']:.3f}  "
                      f"MRR {row['mrr']:.3f}  ({row['seconds']:.0f} s)")
    console.print(f"results: {path}")
    return facts
