"""The shipped configs are package data (issue 15.6): a wheel carries tiny.yaml, gpt2xl.yaml, the DeepSpeed JSONs and
the offline model configs, and the documented paths (`--config configs/gpt2xl.yaml`) resolve against the package
when they do not exist from the working directory, for a checkout and for an unpacked wheel alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distributed_astra.config import CONFIGS_DIR, DEFAULT_CONFIG, load_config, resolve_config_path
from distributed_astra.distributed.deepspeed_config import ds_config_path, load_ds_config
from distributed_astra.errors import DastraError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["tiny.yaml", "gpt2xl.yaml", "ds/zero0.json", "ds/zero1.json", "ds/zero2.json", "ds/zero3.json",
           "models/gpt2-xl.json"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info from this test)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "distributed_astra", src / "distributed_astra",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
         str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("distributed_astra-*.whl")
    return built


def test_wheel_holds_the_shipped_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in SHIPPED:
        assert f"distributed_astra/configs/{rel}" in names, f"{rel} is missing from {wheel.name}"
    assert "distributed_astra/report/template.html.j2" in names  # the package data that was already there
    assert not any(n.startswith("configs/") for n in names), "configs/ must live inside the package"


def test_unpacked_wheel_resolves_documented_paths(wheel, tmp_path):
    """An installed wheel (unpacked: it is pure Python) loads `configs/gpt2xl.yaml` from an unrelated directory, its
    default tiny.yaml and its ZeRO-3 JSON, all from inside the installed package."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import distributed_astra, pathlib\n"
        "from distributed_astra.config import load_config, DEFAULT_CONFIG\n"
        "from distributed_astra.distributed.deepspeed_config import ds_config_path\n"
        "pkg = pathlib.Path(distributed_astra.__file__).resolve().parent\n"
        f"assert pkg.is_relative_to({str(site.resolve())!r}), pkg\n"
        "assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.is_relative_to(pkg)\n"
        "cfg = load_config('configs/gpt2xl.yaml')\n"
        "assert cfg.model.hub_id == 'gpt2-xl' and cfg.deepspeed.stage == 3\n"
        "assert ds_config_path(cfg).is_file() and ds_config_path(cfg).is_relative_to(pkg)\n"
        "load_config(None)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_shipped_configs_live_in_the_package():
    assert CONFIGS_DIR == ROOT / "distributed_astra" / "configs"
    assert DEFAULT_CONFIG == CONFIGS_DIR / "tiny.yaml"
    for rel in SHIPPED:
        assert (CONFIGS_DIR / rel).is_file(), rel
    assert not (ROOT / "configs").exists(), "the configs moved to distributed_astra/configs/ (no top-level copy)"


def test_documented_relative_paths_fall_back_to_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/gpt2xl.yaml") == CONFIGS_DIR / "gpt2xl.yaml"
    assert resolve_config_path("gpt2xl.yaml") == CONFIGS_DIR / "gpt2xl.yaml"
    assert resolve_config_path("configs/ds/zero3.json") == CONFIGS_DIR / "ds" / "zero3.json"
    assert load_config("configs/gpt2xl.yaml").model.hub_id == "gpt2-xl"
    assert load_config("configs/tiny.yaml") == load_config(None)
    # deepspeed.config takes the same documented names
    cfg = load_config("configs/gpt2xl.yaml", ["deepspeed.config=configs/ds/zero3.json"])
    assert ds_config_path(cfg) == CONFIGS_DIR / "ds" / "zero3.json"
    assert load_ds_config(cfg)["zero_optimization"]["stage"] == 3


def test_a_file_that_exists_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "gpt2xl.yaml").write_text("solver:\n  damping: 0.5\n")
    assert resolve_config_path("configs/gpt2xl.yaml") == Path("configs/gpt2xl.yaml")
    assert load_config("configs/gpt2xl.yaml").solver.damping == 0.5


def test_a_path_found_nowhere_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DastraError, match="config file 'configs/nope.yaml' not found"):
        load_config("configs/nope.yaml")
    with pytest.raises(DastraError, match="'/abs/gpt2xl.yaml' not found"):
        load_config("/abs/gpt2xl.yaml")  # absolute paths never fall back
