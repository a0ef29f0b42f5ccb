"""Memory of the ranks, for the tracker: `group.call(rank_memory, what=...)` after a distributed stage."""

from __future__ import annotations

import resource

import torch


def rank_memory(state) -> dict[str, float]:
    """This rank's peak resident memory (the worker process's lifetime peak, `ru_maxrss`: a group serves fit and
    then solve, so solve's figure covers both) and, on GPU, `torch.cuda.max_memory_allocated` since the last call
    (reset here, so it is per stage), both in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    device = getattr(state, "device", None)
    if device is not None and device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return out
