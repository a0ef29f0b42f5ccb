"""The memory and time planner (`dastra plan`): per stage, memory per GPU and per node, FLOPs and time, and the
largest micro-batch and query chunk that fit, from a model config alone (no weights, no GPU)."""

from distributed_astra.plan import shapes, simulate
from distributed_astra.plan.estimate import Plan, StageEstimate, check_fits, does_not_fit, make_plan, parse_memory

__all__ = ["Plan", "StageEstimate", "check_fits", "does_not_fit", "make_plan", "parse_memory", "shapes", "simulate"]
