"""Which modules are tracked, and how their weights map to the [out, in(+1)] layout used by every factor.

EK-FAC (seeds §3) is written for W̄ = [W b] of shape [out, in+1]. `nn.Linear` stores W as [out, in]; HF `Conv1D`
stores it as [in, out] (it computes x @ W + b). Factors, gradients and iHVPs are always kept in the [out, in+1]
layout; only `weight_matrix` / `to_parameter_layout` touch the module's own layout, so Conv1D is never rewritten.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from distributed_astra.errors import DastraError


@dataclass(frozen=True)
class TrackedModule:
    """A linear map s = W̄ ā whose parameters take part in attribution."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    is_conv1d: bool

    @property
    def in_dim(self) -> int:
        """Width of ā: the input, plus one column for the bias when there is one."""
        return self.in_features + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the gradient matrix DW̄ = Ds āᵀ."""
        return (self.out_features, self.in_dim)

    def weight_matrix(self) -> torch.Tensor:
        """W̄ = [W b] in the [out, in+1] layout (a copy)."""
        weight = self.module.weight.detach()
        weight = weight.t() if self.is_conv1d else weight
        if self.has_bias:
            weight = torch.cat([weight, self.module.bias.detach()[:, None]], dim=1)
        return weight.clone()

    def to_parameter_layout(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a [..., out, in+1] matrix into tensors shaped like this module's `weight` and `bias`."""
        weight = matrix[..., : self.in_features]
        out = {"weight": weight.transpose(-1, -2) if self.is_conv1d else weight}
        if self.has_bias:
            out["bias"] = matrix[..., self.in_features]
        return out

    def from_parameter_layout(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `to_parameter_layout`: [..., out, in+1] from parameter-shaped tensors."""
        weight = weight.transpose(-1, -2) if self.is_conv1d else weight
        if self.has_bias:
            weight = torch.cat([weight, bias[..., None]], dim=-1)
        return weight


def _describe(name: str, module: nn.Module) -> TrackedModule | None:
    if isinstance(module, nn.Linear):
        return TrackedModule(name, module, module.in_features, module.out_features, module.bias is not None, False)
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return TrackedModule(name, module, in_features, out_features, module.bias is not None, True)
    return None


def select_tracked_modules(model: nn.Module, patterns: list[str]) -> dict[str, TrackedModule]:
    """All `nn.Linear` / HF `Conv1D` modules whose qualified name matches one of the glob `patterns`.

    Modules come back in the model's own order, which fixes the order of factors and flattened vectors.
    """
    tracked: dict[str, TrackedModule] = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            described = _describe(name, module)
            if described is not None:
                tracked[name] = described
    if not tracked:
        linear = [n for n, m in model.named_modules() if _describe(n, m) is not None][:6]
        raise DastraError(
            f"model.tracked_modules {patterns} matches no nn.Linear/Conv1D module; names look like {linear}"
        )
    return tracked
