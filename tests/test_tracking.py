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
