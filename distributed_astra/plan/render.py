"""The plan as a terminal table (`dastra plan`, and `dastra run` when it refuses a config) or as Markdown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from distributed_astra.plan.estimate import GIB, MAX_SEARCHED_QUERIES, Plan


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:,.2f}"


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a (set plan.documents)"
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def _flops(flops: float | None) -> str:
    return "n/a" if flops is None else f"{flops:.3g}"


def header_lines(plan: Plan) -> list[str]:
    nodes = -(-plan.gpus // plan.gpus_per_node)
    docs = "unknown" if plan.documents is None else f"{plan.documents:,}"
    return [
        f"model {plan.model_name}: {plan.num_parameters / 1e6:,.1f}M parameters, {plan.num_tracked_modules} tracked "
        f"modules with D = {plan.tracked_parameters / 1e6:,.1f}M parameters",
        f"{plan.gpus} GPU(s) on {nodes} node(s) of {plan.gpus_per_node}; {plan.device}: {plan.gpu_memory / GIB:,.1f} "
        f"GiB, {plan.budget / GIB:,.1f} GiB usable; time at {plan.throughput_tflops:g} TFLOP/s per GPU",
        f"corpus: {docs} documents ({plan.documents_source}); queries: {plan.num_queries} ({plan.queries_source})",
        "parameters per GPU under ZeRO stage 0/1/2/3: "
        + " / ".join(f"{_gib(plan.zero_parameters[s])} GiB" for s in range(4))
        + f" (this config: stage {plan.zero_stage})",
    ]


def footer_lines(plan: Plan) -> list[str]:
    lines = []
    if plan.max_micro_batch:
        lines.append(
            "largest micro-batch that fits: "
            + ", ".join(f"{field} = {value}" for field, value in plan.max_micro_batch.items())
        )
        if plan.max_query_chunk is not None:
            lines.append(f"largest query chunk that fits (solver.query_batch_size): {plan.max_query_chunk}")
        capped = " (the search stops there)" if plan.max_scored_queries == MAX_SEARCHED_QUERIES else ""
        lines.append(f"most queries scored in one pass over the corpus (scoring.queries_per_pass): "
                     f"{plan.max_scored_queries}{capped}")
    lines.append(f"scoring ({plan.score_mode}): every query in {plan.scoring_passes} pass(es) over the corpus"
                 + (" (scoring.queries_per_pass)" if plan.scoring_passes > 1 else ""))
    if plan.store_bytes is not None:
        lines.append(
            f"projected gradient store on disk: {_gib(plan.store_bytes)} GiB "
            f"({plan.documents:,} documents x {plan.projection_dim:,} projected entries)"
        )
    else:
        lines.append(f"projected gradient store on disk: n/a (corpus size unknown; {plan.projection_dim:,} entries per document)")
    failing = plan.failing()
    lines.append(
        "verdict: every stage fits"
        if not failing
        else "verdict: DOES NOT FIT: " + ", ".join(s.stage for s in failing)
    )
    return lines


COLUMNS = ("stage", "params", "resident", "working", "per GPU", "per node", "resident holds", "batch", "FLOPs", "time",
           "fits")


def _row(plan: Plan, s) -> list[str]:
    return [
        s.stage, _gib(s.parameters), _gib(s.resident), _gib(s.working), _gib(s.per_gpu),
        _gib(s.per_gpu * plan.gpus_on_a_node), s.resident_what, s.batch, _flops(s.flops), _time(s.seconds),
        "yes" if s.per_gpu <= plan.budget else "NO",
    ]


def plan_table(plan: Plan) -> Table:
    table = Table(title="memory (GiB) and time per stage", title_justify="left")
    for column in COLUMNS:
        numeric = column in ("params", "resident", "working", "per GPU", "per node", "FLOPs")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for s in plan.stages:
        row = _row(plan, s)
        row[-1] = "[green]yes[/]" if row[-1] == "yes" else "[bold red]NO[/]"
        table.add_row(*row)
    return table


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    for line in header_lines(plan):
        console.print(line, highlight=False)
    console.print(plan_table(plan))
    for line in footer_lines(plan):
        console.print(line, highlight=False)


def plan_json(plan: Plan) -> dict:
    """`dastra plan --json`: the table as one object (bytes, FLOPs and seconds unrounded) and the verdict."""
    return {
        "model": plan.model_name, "parameters": plan.num_parameters, "tracked_parameters": plan.tracked_parameters,
        "tracked_modules": plan.num_tracked_modules, "busiest_owner_modules": plan.busiest_owner_modules,
        "busiest_owner": plan.busiest_owner,
        "gpus": plan.gpus, "gpus_per_node": plan.gpus_per_node, "gpu_memory_bytes": plan.gpu_memory,
        "budget_bytes": plan.budget, "zero_stage": plan.zero_stage, "solve_mode": plan.solve_mode,
        "score_mode": plan.score_mode, "scoring_passes": plan.scoring_passes,
        "documents": plan.documents, "queries": plan.num_queries,
        "stages": [
            {"stage": s.stage, "parameter_bytes": s.parameters, "resident_bytes": s.resident,
             "resident_holds": s.resident_what, "working_bytes": s.working, "bytes_per_gpu": s.per_gpu,
             "gpu_bytes_per_node": s.per_gpu * plan.gpus_on_a_node, "batch": s.batch, "flops": s.flops,
             "seconds": s.seconds, "fits": s.per_gpu <= plan.budget}
            for s in plan.stages
        ],
        "max_micro_batch": plan.max_micro_batch, "max_query_chunk": plan.max_query_chunk,
        "max_scored_queries": plan.max_scored_queries, "store_bytes": plan.store_bytes,
        "fits": plan.fits, "failing": [s.stage for s in plan.failing()],
    }


def plan_markdown(plan: Plan) -> str:
    lines = [f"- {line}" for line in header_lines(plan)] + [""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row(plan, s)) + " |" for s in plan.stages]
    lines += [""] + [f"- {line}" for line in footer_lines(plan)]
    return "\n".join(lines) + "\n"
