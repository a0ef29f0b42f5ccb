"""The model the planner reasons about: its HF config (no weights) and an instance on the `meta` device.

Where the config comes from, first match wins:
  1. `plan.hf_config`: a `config.json` (e.g. `configs/models/gpt2-xl.json`, shipped for offline planning; a
     relative path not found from the working directory falls back to the package's `distributed_astra/configs/`);
  2. `model.source: tiny`: the demo GPT-2 built from `model.tiny` and `data.max_length`;
  3. `model.source: path`: `<model.path>/config.json`;
  4. `model.source: hub`: `configs/models/<hub id>.json` when shipped, else the local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, PretrainedConfig

from distributed_astra.config import CONFIGS_DIR, Config, resolve_config_path
from distributed_astra.errors import DastraError
from distributed_astra.models.load import DTYPES
from distributed_astra.models.modules import TrackedModule, select_tracked_modules

SHIPPED_MODEL_CONFIGS = CONFIGS_DIR / "models"


def _from_json(path: Path, field: str) -> PretrainedConfig:
    if not path.is_file():
        raise DastraError(f"{field}: '{path}' not found; point it at a model's config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DastraError(f"{field}: '{path}' is not a Hugging Face config.json ({exc})") from None


def model_config(cfg: Config) -> PretrainedConfig:
    """The HF config of the run's model, without downloading or reading any weight (see the module docstring)."""
    if cfg.plan.hf_config:
        return _from_json(resolve_config_path(cfg.plan.hf_config), "plan.hf_config")
    if cfg.model.source == "tiny":
        tiny = cfg.model.tiny
        return GPT2Config(
            vocab_size=tiny.vocab_size,
            n_positions=cfg.data.max_length,
            n_embd=tiny.n_embd,
            n_layer=tiny.n_layer,
            n_head=tiny.n_head,
            bos_token_id=0,  # the demo tokenizer's <|endoftext|> (data/tokenizer.py)
            eos_token_id=0,
        )
    if cfg.model.source == "path":
        if not cfg.model.path:
            raise DastraError("model.path is empty: set it to a local HF model folder (model.source is 'path')")
        return _from_json(Path(cfg.model.path) / "config.json", "model.path")
    hub_id = cfg.model.hub_id or ""
    shipped = SHIPPED_MODEL_CONFIGS / f"{hub_id.split('/')[-1]}.json"
    if hub_id and shipped.is_file():
        return _from_json(shipped, "model.hub_id")
    try:
        return AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError):
        raise DastraError(
            f"model.hub_id '{hub_id}' is not in the local Hugging Face cache: set model.path to a local HF model "
            "folder, or plan.hf_config to its config.json"
        ) from None


def meta_model(hf_config: PretrainedConfig, dtype: str) -> nn.Module:
    """The model with every tensor on the `meta` device (shapes only), eager attention as `models.load` uses,
    prepared like `prepare_for_attribution` (eval, frozen, gradients through the input embeddings)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[dtype], attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied lm_head counts once, as in `named_parameters`)."""
    return sum(p.numel() for p in model.parameters())


def largest_leaf_parameters(model: nn.Module) -> int:
    """Parameters of the largest module that owns parameters directly (what ZeRO-3 gathers at once, at least)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def tracked_modules(model: nn.Module, cfg: Config) -> dict[str, TrackedModule]:
    return select_tracked_modules(model, cfg.model.tracked_modules)


def tracked_parameters(tracked: dict[str, TrackedModule]) -> int:
    """D: entries of the [out, in+1] gradient matrices of every tracked module."""
    return sum(t.shape[0] * t.shape[1] for t in tracked.values())
