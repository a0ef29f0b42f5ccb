"""launch/run_gpt2xl.sh end to end: a real local Ray head on 127.0.0.1, `ray job submit` of `dastra run` on the tiny
model and corpus (MODEL_PATH, DATA_PATH, QUERIES), then the run's files and its offline W&B run read from disk."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distributed_astra import context
from distributed_astra.config import load_config
from wandb.proto import wandb_internal_pb2

from tests.test_tracking import logged_media
from tests.wandb_offline import _records, read_offline_run

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
NUM_QUERIES = 3
ITERATIONS = 3


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # 401 without a token: the job server is up
    except (urllib.error.URLError, OSError):
        return False
    return True


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free 127.0.0.1 ports in its own process group; (process, job server address),
    or (process, "") when it died while starting (e.g. a port taken in between by another process)."""
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(9)
    worker_base = 20000 + (os.getpid() * 7 + dashboard) % 400 * 100
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    command = [
        str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--min-worker-port", str(worker_base),
        "--max-worker-port", str(worker_base + 99), "--num-cpus", "1", "--object-store-memory", "100000000",
        "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir,
    ]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while not ("block forever" in log_path.read_text() and _answers(f"{address}/api/version")):
        if head.poll() is not None:
            return head, ""
        assert time.time() < deadline, "the Ray head did not start within 120 s"
        time.sleep(1)
    return head, address


def _stop(head: subprocess.Popen) -> None:
    head.terminate()  # `--block` turns SIGTERM into stopping every process this head started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head on 127.0.0.1 (three tries with fresh ports); stopped by its pid at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayl", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        for _ in range(3):
            head, address = _start_head(temp_dir)
            if address:
                break
            _stop(head)
        assert address, (Path(temp_dir) / "head.log").read_text()[-2000:]
        try:
            yield address
        finally:
            _stop(head)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny GPT-2 (with its tokenizer) and the demo corpus built by the package itself, plus a few queries."""
    root = tmp_path_factory.mktemp("assets")
    cfg = load_config(None, [
        f"output.run_dir={root}", "tracking.wandb_mode=disabled", "data.num_stdlib_docs=60", "data.num_facts=4",
        "data.max_length=64", "model.tiny.vocab_size=512", "model.tiny.n_layer=1", "model.tiny.n_embd=32",
        "model.tiny.n_head=2", "model.tiny.train_steps=20", "model.tiny.train_batch_size=8",
    ])
    ctx = context.open_context(cfg, "prepare")
    ctx.tracker.close()
    queries = pq.read_table(root / "data" / "queries.parquet").slice(0, NUM_QUERIES)
    pq.write_table(queries, root / "queries.parquet")
    return {"model": root / "model", "corpus": root / "data" / "corpus.parquet", "queries": root / "queries.parquet"}


def test_run_gpt2xl_sh_submits_a_ray_job_that_writes_topk_report_and_wandb(ray_head, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ, "RAY_ADDRESS": ray_head, "NUM_GPUS": "0", "MODEL_PATH": str(tiny_assets["model"]),
        "DATA_PATH": str(tiny_assets["corpus"]), "QUERIES": str(tiny_assets["queries"]), "RUN_DIR": str(run_dir),
        "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    small = ["model.dtype=float32", "data.max_length=64", f"solver.iterations={ITERATIONS}", "solver.minibatch_size=4",
             "factors.max_sequences=48", "scoring.batch_size=16", "report.num_queries=2"]
    command = [str(ROOT / "launch" / "run_gpt2xl.sh")] + [a for s in small for a in ("--set", s)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Job 'raysubmit_" in output and "succeeded" in output  # it really went through `ray job submit`
    assert f"top-k:         {run_dir}/topk.parquet" in output and f"report:        {run_dir}/report.html" in output

    topk = pq.read_table(run_dir / "topk.parquet")
    assert sorted(set(topk.column("query_id").to_pylist())) == sorted(
        pq.read_table(tiny_assets["queries"]).column("query_id").to_pylist()
    )
    assert (run_dir / "report.html").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["solver"] == "astra" and summary["damping"] == pytest.approx(0.011)  # configs/gpt2xl.yaml's λ

    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    assert f"W&B run:       {wandb_dir}" in output
    run = read_offline_run(wandb_dir)
    assert run.config["solver"]["name"] == "astra" and run.config["model"]["path"] == str(tiny_assets["model"])
    # every query's h per iteration, in ONE table (and one chart), not one series per query
    assert not [key for key in run.keys() if key.startswith("solve/astra/objective/q")]
    (trace_row,) = logged_media(run.history, "solve/astra/trace")
    trace = json.loads((wandb_dir / "files" / trace_row["path"]).read_text())
    column = trace["columns"].index("query_id")
    for query_id in topk.column("query_id").unique().to_pylist():
        assert sum(row[column] == str(query_id) for row in trace["data"]) == ITERATIONS
    assert "solve/astra/per_query" in run.charts
    chunks = math.ceil(NUM_QUERIES / load_config(ROOT / "distributed_astra" / "configs" / "gpt2xl.yaml").solver.query_batch_size)
    steps = [row["solve/astra/iteration"] for row in run.history if "solve/astra/objective_mean" in row]
    assert steps == list(range(ITERATIONS * chunks))  # one continuous axis over the chunks

    # W&B views: the eigen-spectrum histogram of every tracked module, the top-k as a table, the results artifact
    tracked = json.loads((run_dir / "factors" / "meta.json").read_text())["tracked_modules"]
    for module in tracked:
        (histogram,) = logged_media(run.history, f"fit/spectrum/{module}")
        assert histogram["_type"] == "histogram" and sum(histogram["values"]) > 0
    (table_row,) = logged_media(run.history, "score/astra/topk")
    table = json.loads((wandb_dir / "files" / table_row["path"]).read_text())
    assert table["columns"] == topk.column_names
    assert [row[2] for row in table["data"]] == topk.column("doc_id").to_pylist()
    assert offline_artifacts(wandb_dir)[f"{run_dir.name}-results"] == ["report.html", "summary.json"]


def offline_artifacts(wandb_dir: Path) -> dict[str, list[str]]:
    """Artifact name -> its files, from the artifact records of an offline run's .wandb file."""
    (path,) = wandb_dir.glob("run-*.wandb")
    found = {}
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "artifact":
            found[record.artifact.name] = sorted(entry.path for entry in record.artifact.manifest.contents)
    return found


def test_no_ray_cluster_at_ray_address_fails_within_30_s(tiny_assets):
    (port,) = _free_ports(1)  # nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{port}", "NUM_GPUS": "0",
           "MODEL_PATH": str(tiny_assets["model"])}
    start = time.time()
    done = subprocess.run([str(ROOT / "launch" / "run_gpt2xl.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert time.time() - start < 30
    assert done.returncode == 2
    assert f"no Ray cluster answers at RAY_ADDRESS=http://127.0.0.1:{port}" in done.stderr


def test_bad_model_path_is_refused_before_anything_starts(tmp_path):
    env = {**os.environ, "MODEL_PATH": str(tmp_path), "RAY_ADDRESS": "http://127.0.0.1:1"}
    done = subprocess.run([str(ROOT / "launch" / "run_gpt2xl.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "holds no config.json" in done.stderr
