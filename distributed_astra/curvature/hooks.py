"""Per-module activations ā and output gradients Ds, captured with forward hooks and one `autograd.grad` call.

The model is prepared with `prepare_for_attribution` (parameters frozen, input embeddings require grad), so the
tracked modules' outputs require grad while no weight gradient is ever allocated. For a tracked linear map
s = W̄ ā (docs/design.md, "Gradient capture"):

    ā  [B, T, in+1]   the module input with a ones column appended when the module has a bias; zero at padding
    Ds [B, T, out]    ∂loss/∂s, zero at padding
    DW̄_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ   [out, in+1]   the gradient of sequence n's loss (the loss is a sum over sequences)

Usage, one capture per batch (`task` a `task.Task`, e.g. `CAUSAL_LM`):

    with GradientCapture(tracked, task.attention_mask(batch), torch.float64) as capture:
        loss = task.loss(task.output(model, batch), batch).sum()
        capture.backward(loss)
    grads = capture.per_sequence_gradients()

Inputs of rank 2 ([B, in], e.g. an MLP) are treated as sequences of length one; inputs of rank > 3 are flattened
to [B, T', in] and then need `attention_mask=None` or a mask of shape [B, T'].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from distributed_astra.errors import DastraError
from distributed_astra.models.lm import loss_sequence_mask  # noqa: F401  (re-exported: ihvp/solvers.py, curvature)
from distributed_astra.models.modules import TrackedModule


def sequence_gradients(ds: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """DW̄_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ from Ds [B, T, out] and ā [B, T, in+1]: [B, out, in+1], as one bmm (torch's
    einsum of contractions like this can be several times slower on CPU)."""
    return torch.bmm(ds.transpose(1, 2), a)


class GradientCapture:
    """Context manager recording ā and Ds for every tracked module during one forward/backward.

    Raw inputs and output gradients are kept in the model's dtype (no copy in float64 of every activation);
    the accessors return them in the statistics dtype `dtype`, masked and bias-augmented.
    """

    def __init__(
        self,
        tracked: dict[str, TrackedModule],
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.tracked = tracked
        self.attention_mask = attention_mask
        self.dtype = dtype
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._recording = False

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> GradientCapture:
        self._inputs.clear()
        self._outputs.clear()
        self._grads.clear()
        self._recording = True
        for name, tm in self.tracked.items():
            self._handles.append(tm.module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        self._recording = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()  # drop the references into the autograd graph

    def _make_hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._recording:  # e.g. activation-checkpointing recomputation during backward
                return
            if name in self._inputs:
                raise DastraError(
                    f"tracked module '{name}' ran twice in one forward pass; shared (re-used) modules are not "
                    "supported: drop it from model.tracked_modules"
                )
            if not output.requires_grad:
                raise DastraError(
                    f"output of tracked module '{name}' does not require grad: prepare the model with "
                    "prepare_for_attribution (input embeddings must require grad) and run it under torch.enable_grad()"
                )
            if not bool(torch.isfinite(output).all()):
                culprit = "its inputs" if not bool(torch.isfinite(inputs[0]).all()) else "its weights"
                raise DastraError(
                    f"non-finite output (NaN/Inf) of module {name}: {culprit} hold NaN/Inf; "
                    "check the model's weights and dtype (try float32)"
                )
            self._inputs[name] = inputs[0].detach()
            self._outputs[name] = output

        return hook

    # --------------------------------------------------------------- backward
    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Ds for every tracked module from ONE `autograd.grad(loss, outputs)`; checks they are finite.

        A module whose output does not reach the loss gets Ds = 0. On NaN/Inf, raises `DastraError` naming the
        module that is closest to the loss (the last one in forward order), where the non-finite values arise.
        """
        self._recording = False
        if self._inputs and not self._outputs:
            raise RuntimeError("GradientCapture.backward must be called inside the `with` block, once per forward")
        missing = [name for name in self.tracked if name not in self._outputs]
        if missing:
            raise DastraError(
                f"tracked module(s) {missing} were not called in the forward pass: check model.tracked_modules"
            )
        names = list(self._outputs)  # forward order
        grads = torch.autograd.grad(
            loss, [self._outputs[n] for n in names], retain_graph=retain_graph, allow_unused=True
        )
        for name, grad in zip(names, grads):
            out = self._outputs[name]
            self._grads[name] = torch.zeros_like(out) if grad is None else grad.detach()
        if not retain_graph:
            self._outputs.clear()
        bad = [n for n in reversed(names) if not bool(torch.isfinite(self._masked_grad_raw(n)).all())]
        if bad:
            others = f" (also in {len(bad) - 1} upstream module(s): {bad[1:]})" if len(bad) > 1 else ""
            raise DastraError(
                f"non-finite gradient in module {bad[0]}{others}: the loss or the model produced NaN/Inf; "
                "check the model dtype (try float32) and the input batch"
            )

    # ---------------------------------------------------------------- helpers
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...,  d] -> [B, T, d] (rank 2 becomes T = 1)."""
        if x.dim() == 2:
            return x[:, None, :]
        if x.dim() == 3:
            return x
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _mask_for(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The [B, T, 1] 0/1 mask for the flattened tensor x, or None when every position is real."""
        if self.attention_mask is None:
            return None
        mask = self.attention_mask
        if mask.dim() == 1:
            mask = mask[:, None]
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise DastraError(
                f"attention_mask of shape {tuple(self.attention_mask.shape)} does not match the positions "
                f"{tuple(x.shape[:2])} seen by tracked module '{name}'"
            )
        return mask.to(device=x.device)[..., None] != 0

    def _masked_grad_raw(self, name: str) -> torch.Tensor:
        ds = self._flat(self._grads[name])
        mask = self._mask_for(name, ds)
        return ds if mask is None else torch.where(mask, ds, torch.zeros((), dtype=ds.dtype, device=ds.device))

    def _require(self, name: str, store: dict) -> None:
        if name not in self.tracked:
            raise KeyError(f"'{name}' is not a tracked module")
        if name not in store:
            raise RuntimeError(f"nothing captured for '{name}' yet (run the forward, then capture.backward(loss))")

    # -------------------------------------------------------------- accessors
    def activation(self, name: str) -> torch.Tensor:
        """ā [B, T, in+1] in the statistics dtype: ones column for the bias, zero rows at padding."""
        self._require(name, self._inputs)
        a = self._flat(self._inputs[name]).to(self.dtype)
        if self.tracked[name].has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        mask = self._mask_for(name, a)
        return a if mask is None else a * mask.to(self.dtype)

    def output_grad(self, name: str) -> torch.Tensor:
        """Ds [B, T, out] in the statistics dtype, zero rows at padding."""
        self._require(name, self._grads)
        return self._masked_grad_raw(name).to(self.dtype)

    def per_sequence_gradient(self, name: str) -> torch.Tensor:
        """DW̄_n = Σ_t Ds_t ā_tᵀ for each sequence: [B, out, in+1] in the statistics dtype."""
        return sequence_gradients(self.output_grad(name), self.activation(name))

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        """ā of every module (materialised in the statistics dtype; prefer `activation(name)` for big models)."""
        return {name: self.activation(name) for name in self._iter_captured()}

    @property
    def output_grads(self) -> dict[str, torch.Tensor]:
        """Ds of every module (materialised in the statistics dtype; prefer `output_grad(name)`)."""
        return {name: self.output_grad(name) for name in self._grads}

    def per_sequence_gradients(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """DW̄_n [B, out, in+1] for every tracked module (or those of `names`), in the [out, in+1] layout (bias
        last)."""
        return {name: self.per_sequence_gradient(name) for name in (self.tracked if names is None else names)}

    def _iter_captured(self) -> Iterator[str]:
        return (name for name in self.tracked if name in self._inputs)

