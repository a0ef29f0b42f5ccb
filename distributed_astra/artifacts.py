"""Artifacts on disk: atomic writes (temp name, fsync, rename) and metadata that stages check before reading.

Every artifact folder holds a `meta.json`. A stage that reads an artifact states what it expects (model fingerprint,
tracked modules, config hash...) and `check_meta` names the first field that differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from distributed_astra.errors import DastraError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; it replaces `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.is_dir():
            # A folder cannot be replaced in one rename: move the old one aside first, so that readers see
            # either the complete old folder or the complete new one.
            aside = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file`, with a failed write raised as the OSError it is (safetensors reports a full disk
    as a SafetensorError "... (os error 28)"), so the CLI can say what to do instead of printing a traceback."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_meta(folder: Path, artifact: str, producer: str) -> dict[str, Any]:
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        raise DastraError(f"{artifact} not found at '{folder}': run `dastra {producer}` first")
    return json.loads(meta.read_text())


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def check_meta(found: dict[str, Any], expected: dict[str, Any], artifact: str, producer: str) -> None:
    """Raise naming the first expected field whose value differs from the artifact's (JSON-normalised)."""
    for key, want in json.loads(json.dumps(expected)).items():
        if found.get(key) != want:
            raise DastraError(
                f"{artifact}: field '{key}' is {_short(found.get(key))} but this run expects {_short(want)}; "
                f"re-run `dastra {producer}`"
            )
