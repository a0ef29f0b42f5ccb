"""Bad input through the real `dastra` CLI (issue 14, item 5): each case gives one `error:` line naming the file or
setting and the fix, exit code 2, no half-written artifact, and the same command passes once the input is fixed.

Real mechanisms, no mocks: truncated safetensors files, a run directory behind a regular file, on a read-only tmpfs
(a private mount namespace) and without write permission (as root: a child without CAP_DAC_OVERRIDE), a file-size
limit (RLIMIT_FSIZE) under the faiss write, a TCP port nothing listens on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from distributed_astra.cli import app
from tests.conftest import QUERIES, assert_one_line_error, corpus_rows, workspace_overrides, write_workspace

NUM_DOCS = 48
POSITIONS = 32  # write_workspace's tiny GPT-2
REUSED_FACTORS = "reusing factors/ (same model, corpus and factors settings)"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("bad-input"), corpus_rows(NUM_DOCS), QUERIES)


def _args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [
        *workspace_overrides(workspace),
        "data.max_length=32",
        "factors.batch_size=16",
        "scoring.batch_size=16",
        "scoring.top_k=3",
        "solver.name=ekfac",
        "solver.baselines=[]",
        "tracking.wandb_mode=disabled",
        *extra,
    ]
    return ["--run-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def leftovers(root: Path) -> list[Path]:
    """What an interrupted atomic write would leave (artifacts.atomic_path): `.<name>.tmp-<pid>` / `.old-<pid>`."""
    return [p for p in Path(root).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def dastra_child(*args: str, prefix: tuple[str, ...] = (), preamble: str = "", timeout: int = 300):
    """`dastra ARGS` in a child process (optionally under `prefix`, e.g. unshare or setpriv); returns the result
    and its last non-empty line (the console writes to stderr; libraries may print warnings before it)."""
    child = f"{preamble}from distributed_astra.cli import app; import sys; sys.argv[0] = 'dastra'; app()"
    done = subprocess.run(
        [*prefix, sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    return done, output, (lines[-1] if lines else "")


def assert_child_error(done, output: str, last: str, *fragments: str) -> None:
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    assert last.startswith("error:") and sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    for fragment in fragments:
        assert fragment in last, output


@pytest.fixture(scope="module")
def finished(workspace, tmp_path_factory) -> Path:
    """A run with every stage done (fit, query, solve, score, report), copied by the tests that damage it."""
    run_dir = tmp_path_factory.mktemp("finished")
    for stage in ("fit", "query", "solve", "score", "report"):
        ok(stage, *_args(workspace, run_dir))
    return run_dir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def write_queries(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------------------ 1, 7: queries
def _prompt_of(workspace: Path, tokens: int) -> str:
    """The shortest prompt of repeated corpus words with at least `tokens` tokens under the workspace tokenizer (20:
    a query within the model's 32 positions, as the error line it gets shows)."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.append(("alpha", "beta", "gamma", "river")[len(words) % 4])
    return " ".join(words)


@pytest.mark.parametrize(
    "case, tokens, extra, fragments",
    [
        ("beyond-the-model", POSITIONS + 8, (), [f"the model's context of {POSITIONS} positions", "shorten"]),
        ("beyond-max-length", 20, ("data.max_length=16",), ["more than data.max_length=16", "raise data.max_length"]),
    ],
)
def test_a_query_too_long_is_refused_before_any_work(workspace, tmp_path, case, tokens, extra, fragments):
    queries = write_queries(tmp_path / "queries.parquet", [{"query_id": 9, "prompt": _prompt_of(workspace, tokens),
                                                          "completion": " stone"}])
    run_dir = tmp_path / "run"
    result = invoke("run", *_args(workspace, run_dir, f"data.queries={queries}", *extra))
    assert_one_line_error(result, f"data.queries '{queries}'", "query 9 is", *fragments)
    assert not (run_dir / "factors").exists() and not (run_dir / "queries").exists() and not leftovers(run_dir)
    write_queries(queries, [{"query_id": 9, "prompt": "alpha beta", "completion": " stone"}])  # the fix
    ok("query", *_args(workspace, run_dir, f"data.queries={queries}", *extra))


def test_run_checks_queries_before_the_fit_then_reuses_matching_factors_and_refits_otherwise(workspace, tmp_path):
    run_dir = tmp_path / "run"
    bad = write_queries(tmp_path / "bad.parquet", [{"query_id": 7, "prompt": "alpha", "completion": ""}])
    result = invoke("run", *_args(workspace, run_dir, f"data.queries={bad}"))
    assert_one_line_error(result, f"data.queries '{bad}'", "query 7", "completion has no tokens")
    assert not (run_dir / "factors").exists() and not leftovers(run_dir)

    ok("fit", *_args(workspace, run_dir))
    factors_file = run_dir / "factors" / "factors-00000.safetensors"
    fitted = factors_file.stat()
    first = ok("run", *_args(workspace, run_dir))
    assert REUSED_FACTORS in first.output and "reusing queries/" not in first.output
    assert factors_file.stat().st_ino == fitted.st_ino and factors_file.stat().st_mtime_ns == fitted.st_mtime_ns
    second = ok("run", *_args(workspace, run_dir))
    assert REUSED_FACTORS in second.output and "reusing queries/ (same model and queries)" in second.output
    assert factors_file.stat().st_ino == fitted.st_ino

    other = ok("run", *_args(workspace, run_dir, "data.max_length=16"))  # the factors depend on it: refit
    assert REUSED_FACTORS not in other.output
    assert json.loads((run_dir / "factors" / "meta.json").read_text())["data.max_length"] == 16
    assert factors_file.stat().st_ino != fitted.st_ino


# ------------------------------------------------------------------------------------ 2: damaged safetensors
@pytest.mark.parametrize(
    "damaged, stage, producer, untouched",
    [
        ("factors/factors-00000.safetensors", "solve", "fit", "ihvp/ekfac/directions.safetensors"),
        ("queries/gradients-00000.safetensors", "solve", "query", "ihvp/ekfac/directions.safetensors"),
        ("ihvp/ekfac/directions.safetensors", "score", "solve", "topk.parquet"),
        ("factors/factors-00000.safetensors", "report", "fit", "report.html"),
    ],
)
def test_a_truncated_safetensors_file_names_itself_and_the_stage_to_rerun(
    workspace, finished, tmp_path, damaged, stage, producer, untouched
):
    run_dir = copy_of(finished, tmp_path)
    path = run_dir / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = (run_dir / untouched).read_bytes()
    result = invoke(stage, *_args(workspace, run_dir))
    assert_one_line_error(result, f"'{path}' is damaged", f"re-run `dastra {producer}`")
    assert (run_dir / untouched).read_bytes() == before and not leftovers(run_dir)
    ok(producer, *_args(workspace, run_dir))  # the fix the line names
    ok(stage, *_args(workspace, run_dir))


# ---------------------------------------------------------------------------------- 3: an unwritable run dir
def test_a_run_dir_behind_a_regular_file_is_one_line(workspace, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run_dir = blocker / "run"
    result = invoke("fit", *_args(workspace, run_dir))
    assert_one_line_error(result, f"output.run_dir '{run_dir}' is not writable", "Not a directory",
                          "set output.run_dir to a writable folder")
    assert blocker.read_text() == "not a folder"
    result = invoke("fit", *_args(workspace, blocker))
    assert_one_line_error(result, f"output.run_dir '{blocker}' is a file, not a folder")
    ok("fit", *_args(workspace, tmp_path / "run"))  # the fix: a folder


def _read_only_mount_works(probe: Path) -> bool:
    probe.mkdir()
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{probe}' && ! touch '{probe}/x'"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_read_only_run_dir_is_one_line(workspace, tmp_path):
    """EROFS for real: the child runs in its own mount namespace with a read-only tmpfs over the run directory
    (unshare -m; needs CAP_SYS_ADMIN, so it is skipped where mounts are not allowed)."""
    if shutil.which("unshare") is None or not _read_only_mount_works(tmp_path / "probe"):
        pytest.skip("no private mount namespace here (unshare -m + mount -o ro): EROFS cannot be produced for real")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mount = ("unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{run_dir}' && exec \"$@\"", "sh")
    done, output, last = dastra_child("fit", *_args(workspace, run_dir), prefix=mount)
    assert_child_error(done, output, last, f"output.run_dir '{run_dir}' is not writable", "Read-only file system",
                       "set output.run_dir to a writable folder")
    assert not any(run_dir.iterdir())  # the mount is gone with the child: nothing was written under it either
    ok("fit", *_args(workspace, run_dir))  # the same folder, writable


def test_a_run_dir_without_write_permission_is_one_line(workspace, tmp_path):
    """EACCES for real: chmod 555. Root ignores permissions (CAP_DAC_OVERRIDE), so as root the child runs without
    that capability (setpriv); skipped only as root without setpriv."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a permission bit cannot stop this process's writes")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        done, output, last = dastra_child("fit", *_args(workspace, run_dir), prefix=prefix)
    finally:
        run_dir.chmod(0o755)  # the fix
    assert_child_error(done, output, last, f"output.run_dir '{run_dir}' is not writable", "Permission denied",
                       "fix its permissions")
    assert not any(run_dir.iterdir())
    ok("fit", *_args(workspace, run_dir))


# ------------------------------------------------------------------------------------ 4: a full disk in index
def test_a_full_disk_while_writing_the_faiss_index_is_one_line(workspace, tmp_path):
    """`dastra index` in a child whose file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as with ENOSPC) lets
    the store's shards through but not index.faiss, the largest file (float32 vectors of every document)."""
    reference = tmp_path / "reference"
    ok("index", *_args(workspace, reference))
    index_size = (reference / "index" / "index.faiss").stat().st_size
    others = max(p.stat().st_size for p in reference.rglob("*") if p.is_file() and p.name != "index.faiss")
    assert others < index_size
    limit = (others + index_size) // 2
    preamble = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    )
    run_dir = tmp_path / "run"
    done, output, last = dastra_child("index", *_args(workspace, run_dir), preamble=preamble)
    assert_child_error(done, output, last, f"no room to write {run_dir / 'index' / 'index.faiss'}", "File too large",
                       "free disk space")
    assert (run_dir / "store" / "meta.json").is_file()  # the finished store is kept
    assert not (run_dir / "index").exists() and not leftovers(run_dir)
    ok("index", *_args(workspace, run_dir))  # room again: the store is reused, the index written
    assert (run_dir / "index" / "index.faiss").stat().st_size == index_size


# ------------------------------------------------------------------------------------ 5, 6: model folders
@pytest.mark.parametrize(
    "removed, fragments",
    [
        (("model.safetensors",), ["holds no weights (model.safetensors or pytorch_model.bin",
                                  "point model.path at a folder that has them"]),
        (("tokenizer.json", "tokenizer_config.json"), ["holds no tokenizer files (tokenizer.json",
                                                       "tokenizer.save_pretrained"]),
    ],
)
def test_a_model_folder_missing_weights_or_tokenizer_is_named_at_load(workspace, tmp_path, removed, fragments):
    model = tmp_path / "model"
    shutil.copytree(workspace / "model", model)
    for name in removed:
        (model / name).unlink()
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = invoke("fit", *_args(workspace, run_dir, f"model.path={model}"))
    assert_one_line_error(result, f"model.path '{model}'", *fragments)
    assert "offline" not in result.output and "corpus" not in result.output
    assert time.monotonic() - started < 30 and not (run_dir / "factors").exists() and not leftovers(run_dir)
    for name in removed:  # the fix
        shutil.copy(workspace / "model" / name, model / name)
    ok("fit", *_args(workspace, run_dir, f"model.path={model}"))


# ------------------------------------------------------------------------- 8: score checks what it depends on
def test_score_refuses_directions_of_another_max_length_or_corpus(workspace, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    kept = {name: (run_dir / name).read_bytes() for name in ("topk.parquet", "summary.json", "report.html")
            if (run_dir / name).is_file()}
    result = invoke("score", *_args(workspace, run_dir, "data.max_length=16"))
    assert_one_line_error(result, "field 'data.max_length' is 32 but this run has 16", "dastra solve")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(corpus_rows(20, first_id=5000)), other)
    result = invoke("score", *_args(workspace, run_dir, f"data.corpus={other}"))
    assert_one_line_error(result, "field 'data.corpus'", str(other))
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept and not leftovers(run_dir)
    ok("score", *_args(workspace, run_dir))  # the run's own settings


def test_solve_refuses_query_gradients_of_an_edited_queries_file(workspace, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    queries = write_queries(tmp_path / "queries.parquet", QUERIES)
    ok("query", *_args(workspace, run_dir, f"data.queries={queries}"))
    write_queries(queries, [{**q, "completion": q["completion"] + " stone"} for q in QUERIES])  # same path, new text
    before = (run_dir / "ihvp" / "ekfac" / "directions.safetensors").read_bytes()
    result = invoke("solve", *_args(workspace, run_dir, f"data.queries={queries}"))
    assert_one_line_error(result, "query gradients: field 'queries_digest'", "re-run `dastra query`")
    assert (run_dir / "ihvp" / "ekfac" / "directions.safetensors").read_bytes() == before
    ok("query", *_args(workspace, run_dir, f"data.queries={queries}"))
    ok("solve", *_args(workspace, run_dir, f"data.queries={queries}"))


# ------------------------------------------------------------------------------------- 9: the planner's verdict
def test_dastra_plan_exits_2_on_does_not_fit_after_printing_the_plan(workspace, tmp_path):
    args = [a for o in [*workspace_overrides(workspace), "data.max_length=32"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["plan", "--gpu-mem", "1MB", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "DOES NOT FIT" in result.output and "memory (GiB) and time per stage" in result.output
    assert lines[-1].startswith("error: the planner says stage") and "--gpu-mem" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    fits = CliRunner().invoke(app, ["plan", "--gpu-mem", "64MB", *args])  # enough for the tiny model, a short search
    assert fits.exit_code == 0 and "verdict: every stage fits" in fits.output, fits.output


@pytest.mark.parametrize("stage", ["fit", "solve", "score", "index"])
def test_single_stages_are_checked_by_the_planner(workspace, tmp_path, stage):
    run_dir = tmp_path / "run"
    result = invoke(stage, *_args(workspace, run_dir, "plan.gpu_memory=1MB"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "DOES NOT FIT" in result.output and lines[-1].startswith("error: the planner says stage")
    assert "plan.check: false" in lines[-1] and not run_dir.exists()  # refused before any work
    if stage == "fit":
        ok("fit", *_args(workspace, run_dir, "plan.gpu_memory=1MB", "plan.check=false"))


# ------------------------------------------------------------------------------------- 10: skipped corpus rows
def test_skipped_rows_are_reported_by_fit_score_and_run(workspace, tmp_path):
    rows = [{"doc_id": r["doc_id"], "text": r["text"].encode()} for r in corpus_rows(NUM_DOCS)]
    rows[3]["text"], rows[5]["text"], rows[8]["text"] = b"   ", b"\xff\xfe not utf-8", None
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([("doc_id", pa.int64()), ("text", pa.binary())])), corpus)
    run_dir = tmp_path / "run"
    line = f"warning: skipped 3 rows of data.corpus '{corpus}': 2 empty, 1 not UTF-8"
    for stage in ("fit", "run", "score"):
        result = ok(stage, *_args(workspace, run_dir, f"data.corpus={corpus}"))
        assert [x for x in result.output.splitlines() if "skipped" in x and "run directory" not in x] == [line], (
            stage, result.output
        )


# ------------------------------------------------------------------------- 12: nothing listens at ray.address
def test_a_refused_ray_address_says_so_at_once(workspace, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = invoke("fit", *_args(workspace, run_dir, f"ray.address=127.0.0.1:{port}", "ray.num_workers=2"))
    assert_one_line_error(result, f"connection refused at 127.0.0.1:{port}", f"ray start --head --port {port}",
                          "ray.address: null")
    assert "within" not in result.output and time.monotonic() - started < 30
    assert not (run_dir / "factors").exists()
    ok("fit", *_args(workspace, run_dir, "ray.address=null", "ray.num_workers=1"))
