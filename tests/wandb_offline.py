"""Read back what an offline W&B run wrote to disk: the `.wandb` file is a LevelDB-style log of protobuf Records.

Tests use this to check the real files W&B produced (history rows, summary, config, the `define_metric` axes and
custom charts), not a mock.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7  # ":W&B" magic, 2-byte version, 1 reserved byte


def _records(data: bytes) -> list[bytes]:
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _nest(target: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


@dataclass
class OfflineRun:
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)  # define_metric records: name | glob_name, step_metric

    def series(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]

    def keys(self) -> set[str]:
        """Every history key (media flattened as "key/_type", ...), W&B's own (_step, _runtime, ...) left out."""
        return {k for row in self.history for k in row if not k.startswith("_")}

    def step_metric(self, key: str) -> str | None:
        """The x-axis W&B plots `key` against: its own define_metric, else the longest matching glob's."""
        for metric in self.metrics:
            if metric["name"] == key and metric["step_metric"]:
                return metric["step_metric"]
        globs = [m for m in self.metrics if m["glob_name"] and key.startswith(m["glob_name"].rstrip("*"))]
        return max(globs, key=lambda m: len(m["glob_name"]))["step_metric"] if globs else None

    @property
    def charts(self) -> dict:
        """Custom charts (wandb.plot.*) by key: the `_wandb.visualize` entries of the config."""
        return self.config.get("_wandb", {}).get("visualize", {})


def _complete_bytes(path: Path, timeout: float) -> bytes:
    """The file once W&B has written its `exit` record: `wandb.finish()` can return before the service process has
    flushed an offline run (seen under load: the file still holds only its 7-byte header)."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        for raw in reversed(_records(data)):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "exit":
                return data
        if time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """Parse the single `run-*.wandb` file of an `offline-run-*` folder (waiting up to `timeout` s for W&B to
    finish writing it)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for raw in _records(_complete_bytes(path, timeout)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            for item in record.config.update:
                _nest(run.config, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "metric":
            m = record.metric
            run.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
    return run
