#!/usr/bin/env bash
# GPT-2 XL attribution on a Ray cluster: configs/gpt2xl.yaml (distributed_astra/configs/) submitted as a Ray job
# (docs/gpt2xl.md).
#
#   launch/run_gpt2xl.sh [--dry-run] [--set key.path=value ...]
#
# Environment (all optional):
#   RAY_ADDRESS  the cluster's job server, http://head-node:8265 (unset: a local head on 127.0.0.1 is started)
#   NUM_GPUS     GPUs in all = Ray workers (default 8); 0 runs one CPU process (ZeRO off, exact GGN product)
#   MODEL_PATH   a local HF model folder instead of the hub id gpt2-xl
#   DATA_PATH    the corpus Parquet file (text, doc_id)
#   QUERIES      the queries Parquet file (query_id, prompt, completion)
#   RUN_DIR      where the run writes (default runs/gpt2xl-<date>)
# --dry-run prints the planner's table for these settings and submits nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG=distributed_astra/configs/gpt2xl.yaml
NUM_GPUS="${NUM_GPUS:-8}"

abs() { [[ -e "$1" ]] || { echo "error: $2=$1 does not exist" >&2; exit 2; }; echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }

ARGS=()
if [[ -n "${MODEL_PATH:-}" ]]; then
  [[ -f "$MODEL_PATH/config.json" ]] || { echo "error: MODEL_PATH=$MODEL_PATH holds no config.json (a saved HF model folder is needed)" >&2; exit 2; }
  ARGS+=(--set model.source=path --set "model.path=$(abs "$MODEL_PATH" MODEL_PATH)")
fi
if [[ -n "${DATA_PATH:-}" ]]; then
  ARGS+=(--set "data.corpus=$(abs "$DATA_PATH" DATA_PATH)" --set plan.documents=null --set plan.tokens_per_document=null)
fi
[[ -n "${QUERIES:-}" ]] && ARGS+=(--set "data.queries=$(abs "$QUERIES" QUERIES)")
if [[ "$NUM_GPUS" == 0 ]]; then
  # one CPU process: no DeepSpeed, the exact GGN product, the planner checks this machine's RAM
  ARGS+=(--set ray.num_workers=1 --set ray.use_gpu=false --set deepspeed.stage=0 --set solver.product=ggn
         --set plan.gpus=1 --set plan.gpu_memory=null)
else
  # the job joins the cluster it was submitted to
  ARGS+=(--set "ray.num_workers=$NUM_GPUS" --set "plan.gpus=$NUM_GPUS" --set ray.address=auto)
fi

exec "$ROOT/launch/submit.sh" "$CONFIG" "${ARGS[@]}" "$@"
