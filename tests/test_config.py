"""Config loading: defaults, dotted overrides, and errors that name the key path."""

from pathlib import Path

import pytest

from distributed_astra.config import Config, load_config
from distributed_astra.errors import DastraError


def test_embedded_default_loads_and_matches_the_models_defaults():
    cfg = load_config()
    assert cfg.model.source == "tiny"
    assert cfg.solver.damping == "auto"
    assert cfg.factors.dtype == "float64"


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["solver.damping=1e-3", "scoring.top_k=5", "model.tracked_modules=['a.*']"])
    assert cfg.solver.damping == pytest.approx(1e-3)
    assert cfg.scoring.top_k == 5
    assert cfg.model.tracked_modules == ["a.*"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.dampng=1", "unknown key 'solver.dampng'"),
        ("bogus.key=1", "unknown key 'bogus'"),
        ("solver.damping=abc", "solver.damping: Input should be a valid number"),
        ("model.tiny.n_layer=two", "model.tiny.n_layer: Input should be a valid integer"),
        ("scoring.top_k=0", "scoring.top_k: Input should be greater than 0"),
        ("model.dtype=float8", "model.dtype: Input should be"),
        ("novalue", "expected KEY.PATH=VALUE"),
    ],
)
def test_bad_keys_and_types_name_the_key_path(override, message):
    with pytest.raises(DastraError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_in_a_yaml_file_names_file_and_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("factors:\n  strategy: ekfac\n  batchsize: 4\n")
    with pytest.raises(DastraError, match=r"bad\.yaml: unknown key 'factors\.batchsize'"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DastraError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_changes_only_with_its_sections():
    a, b = Config(), Config()
    b.scoring.top_k = 3
    assert a.section_hash("data", "factors") == b.section_hash("data", "factors")
    b.factors.seed = 7
    assert a.section_hash("data", "factors") != b.section_hash("data", "factors")
