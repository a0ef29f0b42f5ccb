"""The memory and time planner (`dastra plan`): per stage, memory per GPU and per node, FLOPs and time, and the
largest micro-batch and query chunk that fit, from a model config alone (no weights, no GPU)."""

from distributed_astra.config import Config
from distributed_astra.plan import shapes, simulate
from distributed_astra.plan.estimate import Plan, StageEstimate, does_not_fit, make_plan, parse_memory
from distributed_astra.plan.render import print_plan

__all__ = ["Plan", "StageEstimate", "check_fits", "does_not_fit", "make_plan", "parse_memory", "shapes", "simulate"]


def check_fits(cfg: Config) -> Plan | None:
    """Refuse, before any work, a config whose stages the planner says do not fit (`plan.check`); prints the table."""
    if not cfg.plan.check:
        return None
    plan = make_plan(cfg, search=False)
    if plan.fits:
        return plan
    print_plan(plan)
    raise does_not_fit(plan, "or set plan.check: false")
