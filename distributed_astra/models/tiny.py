"""The demo's tiny GPT-2: built from scratch and trained on the demo corpus until it memorises the planted facts."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from distributed_astra.data.sequences import epoch_source
from distributed_astra.errors import DastraError
from distributed_astra.models.lm import IGNORE_INDEX, shifted
from distributed_astra.source.trajectory import OptimizerSettings, TrajectoryRecorder

ADAMW_BETAS = (0.9, 0.98)


def tiny_optimizer_settings(weight_decay: float = 0.0) -> OptimizerSettings:
    """What SOURCE needs of `train_tiny_gpt2`'s optimizer: AdamW, β₁ as its momentum, the weight decay."""
    return OptimizerSettings("adamw", ADAMW_BETAS[0], weight_decay)


def build_tiny_gpt2(
    vocab_size: int, n_layer: int, n_head: int, n_embd: int, max_length: int, seed: int
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 with eager attention and every dropout at 0 (deterministic given `seed`)."""
    if n_embd % n_head:
        raise DastraError(f"model.tiny.n_embd ({n_embd}) must be a multiple of model.tiny.n_head ({n_head})")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_length,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def mean_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective: mean cross-entropy over every predicted token of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, targets = shifted(logits.float(), batch["labels"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def train_tiny_gpt2(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]] | Callable[[int], Iterable[dict[str, torch.Tensor]]],
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    *,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    trajectory: TrajectoryRecorder | None = None,
    checkpoint_steps: Collection[int] = (),
    on_metrics: Callable[[dict[str, float]], None] | None = None,
) -> list[float]:
    """Train with AdamW for `steps` steps (linear warmup, then cosine decay to 0); return the per-step losses.

    `batches` is a list (cycled over, in the same order each pass) or a callable `epoch -> batches` (called again
    whenever an epoch runs out; `shuffled_epochs` in `data/sequences.py` gives one). `on_step(step, loss)` is
    called after every step, and `on_metrics({"step", "loss", "lr", "grad_norm", "tokens", "sequences"})` (the
    step's learning rate, gradient norm before clipping, predicted tokens and sequences: the tracker's train/*
    series) too. The model is left in eval() mode.

    `trajectory` (built with `tiny_optimizer_settings(weight_decay)`) records every step's learning rate and a
    checkpoint after each step count in `checkpoint_steps` (seeds §6.3). The rate is put on the attribution loss
    scale (docs/design.md): the objective here is the mean over a batch's predicted tokens, the pipeline's G is that
    of the mean over sequences of summed token losses, so the step θ − η∇(mean token loss) is θ − η'∇(pipeline
    loss) with η' = η × sequences / predicted tokens of the batch. Gradient clipping is not modelled.
    """
    if steps <= 0:
        raise DastraError(f"model.tiny.train_steps must be positive (got {steps})")
    source = epoch_source(batches)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=ADAMW_BETAS,
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    model.train()
    epoch = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(losses) < steps:
            produced = False
            for batch in source(epoch):
                produced = True
                loss = mean_token_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                rate_now = scheduler.get_last_lr()[0]
                optimizer.step()
                if trajectory is not None:
                    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                    rate = scheduler.get_last_lr()[0] * len(batch["labels"]) / max(tokens, 1)
                    trajectory.step(rate, model, optimizer, save=len(losses) + 1 in checkpoint_steps)
                scheduler.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(len(losses) - 1, losses[-1])
                if on_metrics is not None:
                    on_metrics({
                        "step": len(losses) - 1, "loss": losses[-1], "lr": rate_now, "grad_norm": float(grad_norm),
                        "tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                        "sequences": int(batch["labels"].shape[0]),
                    })
                if len(losses) == steps:
                    break
            if not produced:
                raise DastraError("no training batches: the corpus gave no sequences")
            epoch += 1
    model.eval()
    return losses
