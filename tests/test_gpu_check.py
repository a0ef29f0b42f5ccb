"""benchmarks/gpu_check.py on its small CPU shape: every check passes, the final line is the JSON of finite positive
figures, the Markdown report is written where --out says; bad arguments are one line and a non-zero exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {
    **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
}
POSITIVE = [
    "num_parameters", "tracked_modules", "tracked_parameters", "fit_seconds", "fit_sequences", "fit_tokens",
    "fit_peak_bytes", "fit_predicted_bytes", "fit_predicted_over_measured", "solve_seconds_per_iteration",
    "solve_seconds", "solve_damping", "solve_peak_bytes", "solve_predicted_bytes", "solve_predicted_over_measured",
    "score_plain_sequences_per_s", "score_q1_sequences_per_s", "score_q16_sequences_per_s",
    "score_q1_time_over_plain", "score_q16_time_over_plain", "score_peak_bytes", "score_predicted_bytes",
    "score_predicted_over_measured", "total_seconds",
]


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def test_gpu_check_runs_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = run_check("--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "failed" not in figures
    assert figures["device"] == "cpu" and figures["backend"] == "gloo" and figures["all_reduce"] == "ok"
    assert figures["collective_device"] == "cpu"
    assert figures["faiss"].startswith("skipped") or figures["faiss"] == "ok"
    for key in POSITIVE:
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert figures["solve_iterations"] == 20 and figures["solve_fell_back"] == 0
    for key in ("fit", "solve", "score"):  # the planner's byte accounting on real tensors: close on the CPU
        assert 0.8 <= figures[f"{key}_predicted_over_measured"] <= 1.25, (key, figures)
    text = out.read_text()
    assert text.startswith("# GPU check") and "benchmarks/gpu_check.py --device cpu" in text
    assert "every check passed" in text and "| ASTRA solve |" in text
    assert not list(tmp_path.glob(".*tmp*")), "the report is written through a temporary file, renamed"


def test_gpu_check_refuses_an_unknown_device_in_one_line(tmp_path):
    proc = run_check("--device", "tpu", "--out", str(tmp_path / "x.md"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["gpu_check: error: --device must be one of cuda, cpu, got 'tpu'"]
    assert not (tmp_path / "x.md").exists()
