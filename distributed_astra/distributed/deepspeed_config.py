"""The DeepSpeed JSON of a run: read `configs/ds/zero{stage}.json` (package data in `distributed_astra/configs/ds/`)
or `deepspeed.config` (a relative path not found from the working directory falls back to the shipped configs),
check it against the run config, and turn it into the inference-only config the ranks use.

Attribution never trains: no optimizer, no gradient of any parameter. ZeRO stages 1 and 2 shard only optimizer state
and gradients, so they have nothing to shard here, and DeepSpeed refuses them without an optimizer ("zero stage 1
requires an optimizer"): a stage-1/2 run uses the replicated stage-0 engine and says so (`effective_stage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distributed_astra.config import CONFIGS_DIR, Config, resolve_config_path
from distributed_astra.errors import DastraError

DS_CONFIG_DIR = CONFIGS_DIR / "ds"
# DeepSpeed's precision sections for each model dtype; ZeRO-3 partitions float16/bfloat16/float32 parameters only.
_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}
ZERO3_DTYPES = ("float32", "bfloat16", "float16")


def effective_stage(stage: int) -> int:
    """The ZeRO stage the engines really run: 3 partitions parameters; 0, 1 and 2 are all replicated (stage 0)."""
    return 3 if stage == 3 else 0


def ds_config_path(cfg: Config) -> Path:
    if cfg.deepspeed.config:
        return resolve_config_path(cfg.deepspeed.config)
    return DS_CONFIG_DIR / f"zero{cfg.deepspeed.stage}.json"


def load_ds_config(cfg: Config) -> dict[str, Any]:
    """The checked DeepSpeed config for the engines (stage rewritten to `effective_stage`, precision filled in).

    A JSON whose ZeRO stage or precision contradicts `deepspeed.stage` / `model.dtype` raises a `DastraError` that
    names the file, the JSON key and the run-config field.
    """
    path = ds_config_path(cfg)
    if not path.is_file():
        raise DastraError(f"deepspeed.config: file '{path}' not found; point it at a DeepSpeed JSON or set it to null")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DastraError(f"deepspeed.config '{path}' is not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise DastraError(f"deepspeed.config '{path}' must hold a JSON object")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != cfg.deepspeed.stage:
        raise DastraError(
            f"deepspeed.config '{path}': zero_optimization.stage is {stage} but deepspeed.stage is "
            f"{cfg.deepspeed.stage}; make them agree"
        )
    dtype = cfg.model.dtype
    for section in ("bf16", "fp16"):
        enabled = bool(ds.get(section, {}).get("enabled", False))
        wanted = _PRECISION.get(dtype) == section
        if section in ds and enabled != wanted:
            raise DastraError(
                f"deepspeed.config '{path}': {section}.enabled is {str(enabled).lower()} but model.dtype is {dtype}; "
                f"make them agree (or drop the '{section}' section: it is filled in from model.dtype)"
            )
        ds[section] = {"enabled": wanted}
    if cfg.deepspeed.stage == 3 and dtype not in ZERO3_DTYPES:
        raise DastraError(
            f"model.dtype {dtype} cannot be partitioned by ZeRO-3 (DeepSpeed takes {', '.join(ZERO3_DTYPES)}): "
            "use model.dtype=float32, or deepspeed.stage=0"
        )
    if "optimizer" in ds or "scheduler" in ds:
        raise DastraError(
            f"deepspeed.config '{path}' has an optimizer/scheduler section: attribution does not train, remove it"
        )
    zero["stage"] = effective_stage(cfg.deepspeed.stage)
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_accumulation_steps", 1)
    return ds
