"""The tracker writes metrics.jsonl and a real offline W&B run (checked on disk, no mock)."""

import json
from pathlib import Path

from distributed_astra.config import TrackingConfig
from distributed_astra.tracking import Tracker
from tests.wandb_offline import read_offline_run


def test_offline_wandb_run_and_jsonl_hold_the_same_keys(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), {"solver": {"damping": 0.1}}, "fit") as tracker:
        tracker.log({"fit/loss": 1.5}, step=0)
        tracker.log({"fit/loss": 1.25}, step=1)
        tracker.summary({"recall@10": 0.9})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fit/loss"] for r in records if "fit/loss" in r] == [1.5, 1.25]
    assert records[-1]["summary/recall@10"] == 0.9
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.series("fit/loss") == [1.5, 1.25]
    assert run.series("step") == [0, 1]
    assert run.summary["recall@10"] == 0.9
    assert run.config["solver"] == {"damping": 0.1}


def test_online_without_api_key_falls_back_to_offline(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with Tracker(tmp_path, TrackingConfig(wandb_mode="online"), {}, "score") as tracker:
        tracker.log({"score/docs": 3})
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_disabled_still_writes_jsonl(tmp_path: Path):
    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), {}, "solve") as tracker:
        tracker.log({"solve/damping": 0.5})
    assert not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["solve/damping"] == 0.5


def test_online_with_a_key_but_no_reachable_server_falls_back_to_offline_at_once(tmp_path: Path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.perf_counter()
    with Tracker(tmp_path, TrackingConfig(wandb_mode="online"), {}, "fit") as tracker:
        tracker.log({"fit/x": 1})
    assert time.perf_counter() - start < 20  # not W&B's 90 s init timeout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_histogram_table_and_artifact_reach_jsonl_and_the_offline_run(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "summary.json").write_text("{}")
    with Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), {}, "run") as tracker:
        tracker.histogram("fit/spectrum/m", [0.5, 1.5, float("nan"), 2.5])
        tracker.table("score/topk", {"query_id": [1, 1], "doc_id": [7, 3], "score": [0.5, 0.25]})
        tracker.artifact("results", "results", [tmp_path / "summary.json", tmp_path / "absent.html"])
        location = tracker.wandb_location
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in records for k, v in r.items()}
    assert merged["fit/spectrum/m/count"] == 3 and merged["fit/spectrum/m/mean"] == 1.5
    assert merged["score/topk/rows"] == 2 and merged["artifact/results"] == [str(tmp_path / "summary.json")]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert merged["wandb_run"] == location == str(run_dir)
    run = read_offline_run(run_dir)
    (hist,) = logged_media(run.history, "fit/spectrum/m")
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 3
    (table,) = logged_media(run.history, "score/topk")
    data = json.loads((run_dir / "files" / table["path"]).read_text())
    assert data["columns"] == ["query_id", "doc_id", "score"] and data["data"] == [[1, 7, 0.5], [1, 3, 0.25]]


def logged_media(history: list[dict], key: str) -> list[dict]:
    """The rows' values of a media key (histogram, table) as dicts: W&B stores them flattened ("key/_type") or as
    one nested value ("key": {"_type": ...}) depending on the run's history writer."""
    found = []
    for row in history:
        if isinstance(row.get(key), dict):
            found.append(row[key])
        elif f"{key}/_type" in row:
            found.append({k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(f"{key}/")})
    return found
