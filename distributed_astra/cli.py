"""The `dastra` command: parse arguments, build the config, call a stage. Nothing else lives here.

The stages are imported inside the commands (`# deferred: torch`): `dastra --help`, `dastra config` and a bad
option answer without loading torch, transformers or Ray.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from distributed_astra.config import Config, config_yaml, load_config
from distributed_astra.errors import DastraError
from distributed_astra.progress import console

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit
NOT_WRITABLE = {  # errno -> what to say: a read-only disk, no permission, a path through a regular file
    errno.EROFS: "is on a read-only file system: set output.run_dir to a folder on a writable disk",
    errno.EACCES: "is not accessible (permission denied): fix its permissions or set output.run_dir to a writable folder",
    errno.EPERM: "is not accessible (operation not permitted): fix its permissions or set output.run_dir to a writable "
    "folder",
    errno.ENOTDIR: "goes through a regular file (not a directory): set output.run_dir to a folder path",
}
PLANNED_STAGES = ("fit", "solve", "score", "index")  # the planner refuses what it says cannot fit (plan.check)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-data attribution with EK-FAC and ASTRA.")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: configs/tiny.yaml)")]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="dotted override, e.g. --set solver.damping=1e-3")
]
RunDirOption = Annotated[Optional[str], typer.Option("--run-dir", help="shortcut for --set output.run_dir=...")]
SolverOption = Annotated[
    Optional[str],
    typer.Option(
        "--solver", "--method",
        help="ekfac | sni | lissa | astra | source | astra-source (shortcut for --set solver.name=...)",
    ),
]


def _config(
    config: Path | None, overrides: list[str] | None, run_dir: str | None, solver: str | None = None
) -> Config:
    overrides = list(overrides or [])
    if run_dir is not None:
        overrides.append(f"output.run_dir={run_dir}")
    if solver is not None:
        overrides.append(f"solver.name={solver}")
    return load_config(config, overrides)


def _guarded(action: Callable[[], None]) -> None:
    """One line on bad input, exit code 2; Ctrl-C exits 130. Artifacts are written atomically, so nothing is torn."""
    try:
        action()
    except DastraError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: finished artifacts are kept; re-run the same command to continue")
        raise typer.Exit(130) from None
    except OSError as exc:
        if exc.errno not in DISK_FULL and exc.errno not in NOT_WRITABLE:
            raise
        name = _final_name(exc.filename)
        if exc.errno in DISK_FULL:
            line = (
                f"no room to write {name or 'an artifact'} ({os.strerror(exc.errno)}): free disk space or set "
                "output.run_dir on another disk, then re-run; finished artifacts are kept"
            )
        else:
            line = f"'{name or 'a file'}' {NOT_WRITABLE[exc.errno]}, then re-run; finished artifacts are kept"
        console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _final_name(filename: object) -> str | None:
    """The artifact a failed write was for: atomic writes go to `.<name>.tmp-<pid>` (artifacts.atomic_path)."""
    if filename is None:
        return None
    return re.sub(r"(^|/)\.([^/]+)\.tmp-\d+(?=/|$)", r"\1\2", os.fsdecode(filename))


def _stage(
    name: str, config: Path | None, overrides: list[str] | None, run_dir: str | None, solver: str | None = None
) -> None:
    from distributed_astra import context, pipeline  # deferred: torch

    def action() -> None:
        cfg = _config(config, overrides, run_dir, solver)
        if name in PLANNED_STAGES:
            from distributed_astra.plan import check_fits  # deferred: torch

            check_fits(cfg)  # a config the planner says cannot fit is refused before any work (plan.check)
        with context.open_context(cfg, name) as ctx:
            result = getattr(pipeline, name)(ctx)
            if name in ("score", "search"):
                pipeline.print_topk(result, ctx.queries, ctx.cfg.scoring.top_k)
            if name == "report":
                console.print(f"report written to {result}", highlight=False)

    _guarded(action)


@app.command()
def fit(config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None) -> None:
    """Fit EK-FAC factors over the corpus (covariances, eigendecomposition, eigenvalue correction)."""
    _stage("fit", config, set_, run_dir)


@app.command()
def query(config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None) -> None:
    """Compute query gradients on the completion tokens."""
    _stage("query", config, set_, run_dir)


@app.command()
def solve(
    config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None, solver: SolverOption = None
) -> None:
    """Solve the iHVPs (G + λI)⁻¹∇f of the query gradients (source | astra-source: per trajectory segment)."""
    _stage("solve", config, set_, run_dir, solver)


@app.command()
def score(
    config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None, solver: SolverOption = None
) -> None:
    """Stream the corpus and keep the top-k documents per query."""
    _stage("score", config, set_, run_dir, solver)


@app.command()
def index(config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None) -> None:
    """Project every document's gradient into the Arrow store and build the faiss index over it."""
    _stage("index", config, set_, run_dir)


@app.command()
def search(
    config: ConfigOption = None,
    set_: SetOption = None,
    run_dir: RunDirOption = None,
    solver: SolverOption = None,
    queries: Annotated[
        Optional[str], typer.Option("--queries", help="queries Parquet file (shortcut for --set data.queries=...)")
    ] = None,
) -> None:
    """Precondition and project the queries, shortlist from the index, re-score exactly, keep the top-k."""
    overrides = list(set_ or []) + ([f"data.queries={queries}"] if queries is not None else [])
    _stage("search", config, overrides, run_dir, solver)


@app.command()
def report(
    config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None, solver: SolverOption = None
) -> None:
    """Write report.html: top-k documents with per-token shading, score distribution, convergence, spectra."""
    _stage("report", config, set_, run_dir, solver)


def _run_and_report(cfg: Config, job: str) -> None:
    from distributed_astra import pipeline  # deferred: torch
    result = pipeline.run(cfg, job)
    pipeline.print_topk(result.topk, result.queries, cfg.scoring.top_k)
    summary = result.summary
    console.print(json.dumps(summary, indent=2))
    for solver, solved in ((summary["solver"], summary), *summary["baselines"].items()):
        recall, line = solved["fact_tracing"], f"[bold]{solver}:[/]"
        if "objective_first_mean" in solved:
            line += f" mean h {solved['objective_first_mean']:.4g} -> {solved['objective_last_mean']:.4g};"
        if recall.get("num_fact_queries"):
            line += (
                f" fact tracing recall@1 = {recall['recall@1']:.2f}, recall@10 = {recall['recall@10']:.2f}, "
                f"MRR = {recall['mrr']:.2f} over {recall['num_fact_queries']} fact queries"
            )
        console.print(line)
    console.print(f"run directory: {cfg.output.run_dir} (open report.html in a browser)")


@app.command()
def run(
    config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None, solver: SolverOption = None
) -> None:
    """Run every stage: fit, query, solve, score; write summary.json and topk.parquet."""

    def action() -> None:
        from distributed_astra.plan import check_fits  # deferred: torch

        cfg = _config(config, set_, run_dir, solver)
        check_fits(cfg)  # a config the planner says cannot fit is refused before any work (plan.check)
        _run_and_report(cfg, "run")

    _guarded(action)


@app.command()
def plan(
    config: ConfigOption = None,
    set_: SetOption = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="GPUs in all (default: plan.gpus)")] = None,
    gpu_mem: Annotated[Optional[str], typer.Option("--gpu-mem", help="memory per GPU, e.g. 80GB")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="also write the plan as Markdown")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as one JSON object instead of the table")] = False,
) -> None:
    """Memory per GPU and per node, FLOPs and time of every stage, from the model config alone (no weights)."""

    def action() -> None:
        from rich.console import Console

        from distributed_astra.artifacts import atomic_path  # deferred: torch
        from distributed_astra.plan import does_not_fit, make_plan  # deferred: torch
        from distributed_astra.plan.render import plan_json, plan_markdown, print_plan  # deferred: torch

        result = make_plan(_config(config, set_, None), gpus, gpu_mem)
        if as_json:
            typer.echo(json.dumps(plan_json(result)))
        else:
            print_plan(result, Console(width=200))
        if markdown is not None:
            with atomic_path(markdown) as tmp:
                tmp.write_text(plan_markdown(result))
        if not result.fits:  # the table above says which stages; the exit code says it to scripts
            raise does_not_fit(result, "or plan with more memory (--gpu-mem, plan.gpu_memory)")

    _guarded(action)


@app.command("config")
def show_config(config: ConfigOption = None, set_: SetOption = None, run_dir: RunDirOption = None) -> None:
    """Print the resolved config: every key with its value, its description, and its default where it differs."""
    _guarded(lambda: print(config_yaml(_config(config, set_, run_dir))))


@app.command()
def demo(run_dir: Annotated[str, typer.Option("--run-dir")] = "runs/demo", set_: SetOption = None) -> None:
    """The whole pipeline on the embedded default (configs/tiny.yaml): demo corpus, tiny GPT-2, EK-FAC-IF, top-10."""
    _guarded(lambda: _run_and_report(_config(None, set_, run_dir), "demo"))


eval_app = typer.Typer(no_args_is_help=True, help="Evaluation: LDS with retraining (Ray), fact tracing.")
app.add_typer(eval_app, name="eval")


@eval_app.command("lds")
def eval_lds(
    task: Annotated[str, typer.Option("--task", help="digits | diabetes | gpt2 | ridge | digits-short | diabetes-short")] = "digits",
    methods: Annotated[
        str, typer.Option("--methods", help="comma-separated: graddot,tracin,trak,ekfac,sni,astra")
    ] = "graddot,tracin,trak,ekfac,sni,astra",
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """LDS of each method on one task (retraining as Ray tasks, cached); writes eval.results_dir/lds.md."""
    from distributed_astra.eval.commands import lds_command  # deferred: torch

    _guarded(lambda: lds_command(_config(config, set_, None), task, [m.strip() for m in methods.split(",") if m]))


@eval_app.command("facts")
def eval_facts(
    methods: Annotated[
        Optional[str], typer.Option("--methods", help="comma-separated: graddot,ekfac,sni,astra (default eval.facts_methods)")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    run_dir: RunDirOption = None,
) -> None:
    """Fact tracing on the demo: recall@1, recall@10 and MRR of the planted document per method."""
    from distributed_astra.eval.commands import facts_command  # deferred: torch

    def action() -> None:
        cfg = _config(config, set_, run_dir)
        names = [m.strip() for m in methods.split(",") if m] if methods else cfg.eval.facts_methods
        facts_command(cfg, names)

    _guarded(action)


def main() -> None:
    sys.exit(app())
