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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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


def rank_file(stem: str, rank: int) -> str:
    """The safetensors file one rank writes its modules' tensors into (`factors-00000.safetensors`)."""
    return f"{stem}-{rank:05d}.safetensors"


def names_by_file(files: dict[str, str], names: list[str]) -> dict[str, list[str]]:
    """{shard file: the names of `names` it holds, in their order} from a {name: shard file} manifest."""
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    return by_file


def load_module_tensors(
    folder: Path, files: dict[str, str], names: list[str], what: str, stage: str, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of `names` from a folder of per-rank shards described by `files` {name: shard file}: each
    shard opened once, only its requested tensors read."""
    missing = [n for n in names if n not in files]
    if missing:
        raise DastraError(f"{what} in '{folder}' lists no shard for {missing}: re-run `dastra {stage}`")
    found: dict[str, torch.Tensor] = {}
    for file, members in names_by_file(files, names).items():
        found.update(load_tensors(Path(folder) / file, what, stage, device=device, names=members))
    return {n: found[n] for n in names}


def load_tensors(
    path: Path, what: str, stage: str, device: str = "cpu", fix: str | None = None, names: list[str] | None = None,
    rows: slice | None = None,
) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, the one way this package reads tensors back: a missing, truncated or otherwise
    damaged file is a one-line DastraError naming it and the stage that rewrites it (`fix` replaces "re-run
    `dastra <stage>`" where no stage does); safetensors' own error names neither. With `names`, only those tensors
    are read (one at a time: a rank loads the modules it owns); with `rows` as well, only those rows of each (a
    chunk of queries)."""
    path = Path(path)
    fix = fix or f"re-run `dastra {stage}`"
    if not path.is_file():
        raise DastraError(f"{what} file '{path}' not found: {fix}")
    try:
        if names is None:
            return load_file(str(path), device=device)
        with safe_open(str(path), framework="pt", device=device) as handle:
            missing = [n for n in names if n not in handle.keys()]
            if missing:
                raise DastraError(f"{what} file '{path}' has no tensor(s) {missing}; {fix}")
            if rows is None:
                return {n: handle.get_tensor(n) for n in names}
            return {n: handle.get_slice(n)[rows] for n in names}
    except (SafetensorError, OSError) as exc:
        raise DastraError(f"{what} file '{path}' is damaged ({_reason(exc)}); {fix}") from None


@contextmanager
def open_tensors(path: Path, what: str, stage: str) -> Iterator[Any]:
    """`safetensors.safe_open` (one tensor at a time) with the errors of `load_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise DastraError(f"{what} file '{path}' not found: run `dastra {stage}`")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise DastraError(f"{what} file '{path}' is damaged ({_reason(exc)}); re-run `dastra {stage}`") from None
    with handle:
        try:
            yield handle
        except SafetensorError as exc:
            raise DastraError(f"{what} file '{path}' is damaged ({_reason(exc)}); re-run `dastra {stage}`") from None


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()).removeprefix("Error while deserializing header: ") or type(exc).__name__


def ensure_writable_dir(folder: Path, key: str = "output.run_dir") -> None:
    """Create `folder` and check that a file can be written in it, before any work: a read-only disk, a folder
    without write permission or a path through a regular file is a one-line DastraError naming it."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise DastraError(f"{key} '{folder}' is a file, not a folder: set {key} to a folder path")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        where = Path(os.fsdecode(exc.filename)) if exc.filename else folder
        if where not in (folder, folder / f".write-test-{os.getpid()}"):
            reason += f" at '{where}'"  # an ancestor could not be created
        raise DastraError(
            f"{key} '{folder}' is not writable ({reason}): set {key} to a writable folder or fix its permissions, "
            "then re-run"
        ) from None


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
    differing = differing_field(found, expected)
    if differing is not None:
        key, was, want = differing
        raise DastraError(
            f"{artifact}: field '{key}' is {_short(was)} but this run expects {_short(want)}; re-run `dastra {producer}`"
        )


def differing_field(found: dict[str, Any], expected: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(key, the artifact's value, the expected value) of the first expected field that differs, or None."""
    for key, want in json.loads(json.dumps(expected)).items():
        if found.get(key) != want:
            return key, found.get(key), want
    return None


def meta_matches(folder: Path, expected: dict[str, Any]) -> bool:
    """Whether `folder/meta.json` exists, is readable and agrees with every field of `expected`."""
    try:
        found = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and differing_field(found, expected) is None


DIRECTIONS_FILE = "directions.safetensors"


def read_directions(folder: Path, expected: dict[str, Any]) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """(query ids, {module: [Q, out, in+1]}) of a solved-directions folder (`ihvp/<solver>/`), checked against
    `expected` (model fingerprint, tracked modules); the ids are as the queries file gives them (meta.json)."""
    meta = read_meta(folder, "solved directions", "solve")
    check_meta(meta, expected, "solved directions", "solve")
    return meta["query_ids"], load_tensors(Path(folder) / DIRECTIONS_FILE, "solved directions", "solve")
