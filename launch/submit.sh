#!/usr/bin/env bash
# Submit `dastra run` for any config as a Ray job, follow its logs, and print where the results are.
#
#   launch/submit.sh CONFIG [--dry-run] [--set key.path=value ...]
#
# CONFIG: a YAML file, or a shipped one by its documented name (configs/gpt2xl.yaml is found in
# distributed_astra/configs/ when ./configs/gpt2xl.yaml does not exist).
#
# Environment:
#   RAY_ADDRESS  the cluster's job server, e.g. http://head-node:8265 (unset: start a local head on 127.0.0.1)
#   RUN_DIR      where the run writes (default runs/<config name>-<date>); must be on storage the head node sees
#   PYTHON       the interpreter with distributed_astra installed, at the same path on every node
#                (default: this checkout's .venv/bin/python)
# --dry-run prints the planner's memory/time table (`dastra plan`) and submits nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: launch/submit.sh CONFIG [--dry-run] [--set key.path=value ...]"
CONFIG="$1"; shift
DRY_RUN=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --set) [[ $# -ge 2 ]] || die "--set needs key.path=value"; OVERRIDES+=(--set "$2"); shift 2 ;;
    *) die "unknown argument '$1' (expected --dry-run or --set key.path=value)" ;;
  esac
done

# ---------------------------------------------------------------------------------------------- prerequisites
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable interpreter: create the venv (make install) or set PYTHON"
RAY_BIN="$(dirname "$PYTHON")/ray"
[[ -x "$RAY_BIN" ]] || RAY_BIN="$(command -v ray || true)"
[[ -n "$RAY_BIN" ]] || die "the 'ray' command is missing: pip install -e . (it brings ray[default])"
"$PYTHON" -c 'import distributed_astra' 2>/dev/null || die "$PYTHON cannot import distributed_astra: pip install -e ."
# The config and overrides must validate before anything is started or uploaded. CONFIG is a file, or a shipped
# config named as the docs do (configs/gpt2xl.yaml: load_config falls back to distributed_astra/configs/).
"$PYTHON" - "$CONFIG" "${OVERRIDES[@]}" <<'EOF' || exit 2
import sys
from distributed_astra.config import load_config
from distributed_astra.errors import DastraError
config, rest = sys.argv[1], sys.argv[2:]
try:
    load_config(config, [rest[i + 1] for i in range(0, len(rest), 2)])
except DastraError as exc:
    sys.exit(f"error: {exc}")
EOF

DASTRA=("$PYTHON" -c 'from distributed_astra.cli import main; main()')
if [[ $DRY_RUN == 1 ]]; then
  exec "${DASTRA[@]}" plan --config "$CONFIG" "${OVERRIDES[@]}"
fi

# ------------------------------------------------------------------------------------------ the Ray cluster
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"  # Ray 2.60 heads use token auth; the CLI then sends the token
if [[ -z "${RAY_ADDRESS:-}" ]]; then
  echo "RAY_ADDRESS is unset: starting a local Ray head on 127.0.0.1 (stop it later with 'ray stop')"
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY_BIN" start --head --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 --disable-usage-stats >/dev/null
  RAY_ADDRESS="http://127.0.0.1:8265"
fi
[[ "$RAY_ADDRESS" == *://* ]] || RAY_ADDRESS="http://$RAY_ADDRESS"
export RAY_ADDRESS
# Any HTTP answer (401 included) means a job server is listening; no answer within 10 s means no cluster.
"$PYTHON" - "$RAY_ADDRESS" <<'EOF' || die "no Ray cluster answers at RAY_ADDRESS=$RAY_ADDRESS: start one ('ray start --head') or unset RAY_ADDRESS to start a local head"
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=10)
except urllib.error.HTTPError:
    pass
except (urllib.error.URLError, OSError):
    sys.exit(1)
EOF

# --------------------------------------------------------------------------------------------- the job
RUN_DIR="${RUN_DIR:-runs/$(basename "${CONFIG%.*}")-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"  # the job runs in an uploaded copy of this tree: paths must be absolute

# The job's environment: what the submitting shell set for these (nothing else leaks; secrets such as
# WANDB_API_KEY belong in the cluster nodes' environment).
RUNTIME_ENV="$("$PYTHON" - <<'EOF'
import json, os
passed = ("WANDB_MODE", "WANDB_BASE_URL", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR",
          "OMP_NUM_THREADS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
print(json.dumps({
    "excludes": [".venv/", ".git/", "runs/", "wandb/", "data/", "**/__pycache__/", ".pytest_cache/", "*.parquet",
                 "*.safetensors", "docs/results/*.png"],
    "env_vars": {name: os.environ[name] for name in passed if name in os.environ},
}))
EOF
)"

echo "submitting to $RAY_ADDRESS: dastra run --config $CONFIG --run-dir $RUN_DIR ${OVERRIDES[*]}"
status=0
"$RAY_BIN" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- "${DASTRA[@]}" run --config "$CONFIG" --run-dir "$RUN_DIR" "${OVERRIDES[@]}" || status=$?  # Ray shell-quotes these

# ------------------------------------------------------------------------------------------ where things are
echo
echo "run directory: $RUN_DIR"
[[ -f "$RUN_DIR/topk.parquet" ]] && echo "top-k:         $RUN_DIR/topk.parquet"
[[ -f "$RUN_DIR/report.html" ]] && echo "report:        $RUN_DIR/report.html"
[[ -f "$RUN_DIR/summary.json" ]] && echo "summary:       $RUN_DIR/summary.json"
if [[ -f "$RUN_DIR/metrics.jsonl" ]]; then
  "$PYTHON" - "$RUN_DIR/metrics.jsonl" <<'EOF'
import json, sys
runs = [r["wandb_run"] for r in map(json.loads, open(sys.argv[1])) if r.get("wandb_run")]
if runs:
    print(f"W&B run:       {runs[-1]}" + ("" if runs[-1].startswith("http") else "  (offline: `wandb sync` it)"))
EOF
fi
if [[ $status != 0 ]]; then
  echo "error: the Ray job failed (exit $status); its log is above ('ray job logs <id>' shows it again)" >&2
  exit 1
fi
