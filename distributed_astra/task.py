"""What a model's examples mean to attribution: the training loss, the measurement and the output Hessian.

A `Task` (kronfluence's idea) is all the core (`curvature/`, `ihvp/`, `scoring/`) knows about a model. For a batch
(a dict of tensors) and the model output z = `output(model, batch)`:

    loss(z, batch)                 L(z_n) per example [B]: the training loss, the ∇L_m of the IF score (seeds §1)
    sampled_loss(z, batch, gen)    a loss whose per-example gradient J_nᵀ r_n has E[r_n r_nᵀ] = H_{z,n}, the output
                                   Hessian: targets drawn from the model's predictive distribution, so that
                                   E[DW̄_n DW̄_nᵀ] = J_nᵀ H_{z,n} J_n (true Fisher = GGN, seeds §2 Eq 12, Eq 17);
                                   the EK-FAC passes and the Fisher product use it
    measurement(z, batch)          f(z_q) per query [B], "loss-like" (a positive score is helpful, seeds §1 Eq 2)
    output_hessian(z, batch)       u ↦ H_z u, the middle factor of the exact GGN product J_nᵀ H_{z,n} J_n v
                                   (seeds §2, footnote 6); u has z's shape, optionally with leading batch dims
    attention_mask(batch)          the positions the module hooks keep (None: every position)
    num_examples(batch)            N_B, the examples that carry a loss: the per-example normalisation of Λ and G̃
    num_positions(batch)           the positions ("tokens") A and S are averaged over (seeds §3)
    num_rows(batch)                the rows of the batch (progress reporting)

Two kinds of task ship with the package:

* `CausalLMTask` (`CAUSAL_LM`, the default everywhere): an HF causal LM on `models/lm.py` batches; a sequence's
  loss is the sum of its token cross-entropies; labels are sampled one per predicted token; H is the softmax-CE
  Hessian per labelled position.
* `ClassificationTask` and `RegressionTask`: any `nn.Module` mapping batch["inputs"] to outputs [B, C]; targets
  in batch["targets"]. Softmax cross-entropy (measurement −margin) and squared error ½‖z − t‖² (H = I). Override
  `output` for another calling convention and `measurement` for another f.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distributed_astra.errors import DastraError
from distributed_astra.models.lm import (
    IGNORE_INDEX,
    loss_sequence_mask,
    sample_categorical,
    sample_labels,
    summed_token_loss,
)

Batch = Mapping[str, torch.Tensor]
OutputHessian = Callable[[torch.Tensor], torch.Tensor]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t upcast to float32 when it is in a narrower float type (bf16/fp16 log-softmax is not stable)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def softmax_probabilities(output: torch.Tensor) -> torch.Tensor:
    """softmax(z) over the last dimension of the detached output, in at least float32 (the CE Hessian's dtype)."""
    return torch.softmax(output.detach().to(torch.promote_types(output.dtype, torch.float32)), dim=-1)


def softmax_ce_hessian(probs: torch.Tensor, u: torch.Tensor, weighted_probs: torch.Tensor) -> torch.Tensor:
    """H u = w ⊙ (p ⊙ u − p (pᵀu)) per position, the CE Hessian in the logits (seeds §2), IN PLACE on u [..., *p].

    probs p [..., V]; weighted_probs = w[..., None] · p (w: 1 on positions that carry a loss). Three passes over u.
    """
    pu = (u * probs).sum(dim=-1, keepdim=True)
    return u.sub_(pu).mul_(weighted_probs)


def _loss_weights(batch: Batch, logits_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] weights of the LM output Hessian: 1 where position t predicts a label (labels[t+1] != -100), 0 at the
    last position (it predicts nothing)."""
    targets = batch["labels"][:, 1:]
    if tuple(targets.shape) != (logits_shape[0], logits_shape[1] - 1):
        raise DastraError(
            f"labels of shape {tuple(batch['labels'].shape)} do not match logits of shape {tuple(logits_shape)}"
        )
    weights = torch.zeros(logits_shape[0], logits_shape[1], dtype=dtype, device=targets.device)
    weights[:, :-1] = (targets != IGNORE_INDEX).to(dtype)
    return weights


def negative_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−margin = −z_t + log Σ_{i≠t} exp z_i per row (seeds §9.1; the negative TRAK margin)."""
    correct = logits.gather(1, target[:, None]).squeeze(1)
    is_target = torch.arange(logits.shape[1], device=logits.device) == target[:, None]
    others = logits.masked_fill(is_target, float("-inf"))
    return torch.logsumexp(others, dim=1) - correct


class Task(ABC):
    """The loss, the measurement and the output Hessian of one kind of model (module docstring)."""

    @abstractmethod
    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model output z of the batch, in the model's dtype (the GGN product differentiates through it)."""

    @abstractmethod
    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example training loss [B] (summed over an example's tokens)."""

    @abstractmethod
    def sampled_loss(self, output: torch.Tensor, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """Per-example loss [B] with targets drawn from the model (`generator` on the output's device)."""

    def measurement(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-query f [B], differentiable (the query gradient is its gradient); the training loss by default."""
        return self.loss(output, batch)

    @abstractmethod
    def output_hessian(self, output: torch.Tensor, batch: Batch) -> OutputHessian:
        """u ↦ H_z u at the (detached) output z; the result is in at least float32 and may overwrite u."""

    def check_batch(self, batch: Batch) -> None:
        """Raise `DastraError` when the batch lacks what this task reads (before any forward)."""

    def attention_mask(self, batch: Batch) -> torch.Tensor | None:
        """The 0/1 mask of real positions the hooks keep; None: every position is real."""
        return None

    @abstractmethod
    def num_examples(self, batch: Batch) -> int:
        """N_B: the examples of the batch that carry a loss."""

    def num_positions(self, batch: Batch) -> int:
        """The positions A and S are averaged over: one per example unless a task says otherwise."""
        return self.num_rows(batch)

    @abstractmethod
    def num_rows(self, batch: Batch) -> int:
        """The number of rows of the batch, loss-carrying or not."""


class CausalLMTask(Task):
    """An HF causal LM on `models/lm.py` batches (input_ids, attention_mask, labels [B, T]; docs/design.md)."""

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return summed_token_loss(at_least_float32(output), batch["labels"])

    def sampled_loss(self, output: torch.Tensor, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """Σ_t CE with one label per predicted token drawn from the model (`models.lm.sample_labels`)."""
        logits = at_least_float32(output)
        return summed_token_loss(logits, sample_labels(logits, batch["labels"], generator))

    def output_hessian(self, output: torch.Tensor, batch: Batch) -> OutputHessian:
        """The softmax-CE Hessian per position, weight 1 where the position predicts a label (0 elsewhere)."""
        probs = softmax_probabilities(output)
        weighted_probs = probs * _loss_weights(batch, output.shape, probs.dtype)[..., None]
        return lambda u: softmax_ce_hessian(probs, u.to(probs.dtype), weighted_probs)

    def check_batch(self, batch: Batch) -> None:
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise DastraError(f"batch has no '{key}' (keys: {sorted(batch)}): build batches with the data loader")

    def attention_mask(self, batch: Batch) -> torch.Tensor:
        return batch["attention_mask"]

    def num_examples(self, batch: Batch) -> int:
        """Sequences with at least one predicted token (`models.lm.loss_sequence_mask`)."""
        return int(loss_sequence_mask(batch["labels"]).sum())

    def num_positions(self, batch: Batch) -> int:
        """Every position with attention_mask == 1 (docs/design.md: padding has ā = 0 and is not a token)."""
        return int((batch["attention_mask"] != 0).sum())

    def num_rows(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])


CAUSAL_LM = CausalLMTask()


class SupervisedTask(Task):
    """A model mapping batch["inputs"] to outputs [B, C], with targets in batch["targets"] (every row counts)."""

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["inputs"])

    def check_batch(self, batch: Batch) -> None:
        if "targets" not in batch:
            raise DastraError(f"batch has no 'targets' (keys: {sorted(batch)})")

    def num_examples(self, batch: Batch) -> int:
        return self.num_rows(batch)

    def num_rows(self, batch: Batch) -> int:
        return int(batch["targets"].shape[0])


class ClassificationTask(SupervisedTask):
    """Softmax cross-entropy on logits [B, C] and integer targets [B]; f = −margin (seeds §9.1)."""

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(at_least_float32(output), batch["targets"], reduction="none")

    def sampled_loss(self, output: torch.Tensor, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """CE against one class per example drawn from softmax(z) (`models.lm.sample_categorical`)."""
        logits = at_least_float32(output)
        return F.cross_entropy(logits, sample_categorical(logits, generator), reduction="none")

    def measurement(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return negative_margin(at_least_float32(output), batch["targets"])

    def output_hessian(self, output: torch.Tensor, batch: Batch) -> OutputHessian:
        """H u = p ⊙ u − p (pᵀu) per example."""
        probs = softmax_probabilities(output)
        return lambda u: softmax_ce_hessian(probs, u.to(probs.dtype), probs)


class RegressionTask(SupervisedTask):
    """Squared error ½‖z − t‖² on outputs [B, C] and targets of the same shape ([B] when C = 1); H = I."""

    def _residual(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return output - batch["targets"].to(output.dtype).reshape(output.shape)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return 0.5 * self._residual(output, batch).square().flatten(1).sum(dim=1)

    def sampled_loss(self, output: torch.Tensor, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """−εᵀz with Rademacher ε: the gradient −ε of ½‖z − t̂‖² at a target t̂ = z + ε drawn around the output.

        E[εεᵀ] = I = H, as for Gaussian targets (seeds §2: F = G), with less noise; with one output ε² = 1, so the
        "sampled" gradients are ±J_n and A, S, Λ and the Fisher product are the exact GGN's.
        """
        sign = torch.randint(0, 2, output.shape, generator=generator, device=output.device, dtype=output.dtype)
        return -((2 * sign - 1) * output).flatten(1).sum(dim=1)

    def output_hessian(self, output: torch.Tensor, batch: Batch) -> OutputHessian:
        """H u = u (in at least float32)."""
        dtype = torch.promote_types(output.dtype, torch.float32)
        return lambda u: u.to(dtype)
