"""The loss convention shared by every stage (docs/design.md, "Loss scale").

A batch is a dict of tensors:
    input_ids       LongTensor[B, T]
    attention_mask  LongTensor[B, T]   1 for real tokens, 0 for padding
    labels          LongTensor[B, T]   HF convention: aligned with input_ids, -100 where no loss is taken;
                                       the shift (position t predicts token t+1) happens in `shifted`.
    doc_id          LongTensor[B]      the source document of each sequence (training batches only)

The loss of a sequence is the SUM over its predicted tokens; the curvature is the GGN of the MEAN over sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..T-2 and the labels they predict (positions 1..T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of an HF causal LM, upcast to at least float32 (bf16/fp16 log-softmax is not stable)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss [B]: the sum of token cross-entropies over positions whose label is not -100."""
    logits, targets = shifted(logits, labels)
    mask = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(targets)
    return (token_loss * mask).sum(dim=1)


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One class per row of logits [..., V], drawn from softmax(logits) (true Fisher, seeds §2): LongTensor[...].

    Inverse-CDF sampling (one uniform per row, a cumulative sum, `searchsorted`): an order of magnitude faster
    than `torch.multinomial` over a large vocabulary. The float32 cumulative sum shifts each class probability by
    at most ~1e-7 × vocabulary size, far below the Monte-Carlo noise of one draw per row.
    """
    cdf = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1]).cumsum_(dim=-1)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).clamp_(max=cdf.shape[1] - 1).view(logits.shape[:-1])


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution, one per predicted token (true Fisher, seeds §2-3),
    by `sample_categorical`. Returned in the unshifted HF layout, with -100 kept wherever `labels` has it.
    """
    logits, targets = shifted(logits, labels)
    drawn = sample_categorical(logits, generator)
    sampled = labels.clone()
    sampled[:, 1:] = torch.where(targets == IGNORE_INDEX, targets, drawn)
    return sampled


def loss_sequence_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: sequences with at least one predicted token (a label other than -100 after the shift).

    Only these count as sequences for the per-sequence normalisation; rows that carry no loss (padding rows added
    to even out batches, one-token sequences) contribute zero gradient and are not counted.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
