"""The planner's per-GPU memory at 2 ranks against what each rank of a real gloo group holds: the sharded fit and
the modules-mode ASTRA solve (benchmarks/bench_planner_ranks.py, whose docstring says how each is measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_planner_ranks.py"


def test_planner_predicts_each_ranks_peak_of_the_sharded_fit_and_solve_within_20_percent(tmp_path):
    out = tmp_path / "planner_ranks.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["phase"] for r in result["rows"]} == {"fit", "solve"}
    for row in result["rows"]:
        assert len(row["measured"]) == 2 and min(row["measured"]) > 0
        assert abs(row["ratio"] - 1) <= 0.20, row
    assert proc.returncode == 0 and out.is_file()
