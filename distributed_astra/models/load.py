"""Load an HF causal LM from a local path or a hub id, in a chosen dtype, ready for attribution."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from distributed_astra.errors import DastraError

hf_logging.disable_progress_bar()  # stages draw their own progress bars; HF's would interleave with error lines

# what `from_pretrained` reads from a local folder: weights (one of these, or its sharded index) and a tokenizer
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_for_attribution(model: nn.Module) -> nn.Module:
    """eval() (dropout off: G must be symmetric), frozen parameters, and gradients that flow through activations.

    Hooks then see every tracked module's input a and output gradient Ds, and no weight gradient is ever allocated.
    """
    model.eval()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def _resolve(path: str | None, hub_id: str | None) -> str:
    if path:
        if not Path(path, "config.json").is_file():
            raise DastraError(f"model.path '{path}' holds no config.json: point model.path at a saved HF model folder")
        return path
    if hub_id:
        return hub_id
    raise DastraError("model: set model.path (a local HF model folder) or model.hub_id")


def load_causal_lm(path: str | None, hub_id: str | None, dtype: str) -> nn.Module:
    """An `AutoModelForCausalLM` with eager attention (the CPU sdpa kernel lacks double backward and forward-mode AD)."""
    source = _resolve(path, hub_id)
    if path and not any(Path(path, name).is_file() for name in WEIGHT_FILES):
        raise DastraError(
            f"model.path '{path}' holds no weights (model.safetensors or pytorch_model.bin, e.g. from "
            "save_pretrained): point model.path at a folder that has them"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], attn_implementation="eager")
    except OSError as exc:
        if path:
            raise DastraError(
                f"model.path '{path}' could not be loaded ({' '.join(str(exc).split())}): point model.path at a "
                "folder written by save_pretrained"
            ) from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        hint = "the hub is offline (HF_HUB_OFFLINE=1) and" if offline else ""
        raise DastraError(
            f"model.hub_id '{source}' could not be loaded: {hint} it is not in the local cache; "
            "set model.path to a local HF model folder"
        ) from exc
    return prepare_for_attribution(model)


def check_context_length(model: nn.Module, max_length: int) -> None:
    """Refuse `data.max_length` beyond the model's positions (HF configs name them n_positions or
    max_position_embeddings): longer sequences would index past the position embeddings."""
    limit = context_length(model)
    if limit is not None and max_length > limit:
        raise DastraError(
            f"data.max_length {max_length} exceeds the model's context of {limit} positions: set data.max_length "
            f"to at most {limit} (longer documents are split into several sequences)"
        )


def context_length(model: nn.Module) -> int | None:
    """The model's positions (HF configs name them n_positions or max_position_embeddings), None when unstated."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_tokenizer(path: str | None, hub_id: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer next to the model. A local folder without tokenizer files is refused here: transformers would
    build an empty tokenizer from config.json alone, which turns every document into zero tokens."""
    source = _resolve(path, hub_id)
    fix = f"save the model's tokenizer into '{source}' (tokenizer.save_pretrained) or point model.path at a folder with one"
    if path and not any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        raise DastraError(
            f"model.path '{path}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise DastraError(f"no tokenizer for '{source}' ({' '.join(str(exc).split())[:200]}): {fix}") from None
    if len(tokenizer) < 2 or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise DastraError(f"the tokenizer of '{source}' is empty (it turns text into no tokens): {fix}")
    return tokenizer
