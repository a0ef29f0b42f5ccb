"""LDS harness: Spearman against scipy, the sign convention and the whole harness on ridge regression (where the
influence function is exact), retraining as Ray tasks with a resumable disk cache, diverged runs, bad input, CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.config import load_config
from distributed_astra.errors import DastraError
from distributed_astra.eval.lds import _cached_scores, ground_truth, lds_per_query, removed_mask, run_lds, spearman
from distributed_astra.eval.methods import METHODS, MethodSettings, ModelAttribution
from distributed_astra.eval.retrain import RetrainCache
from distributed_astra.eval.tasks import build_task
from tests.conftest import TEST_THREADS
from tests.wandb_offline import read_offline_run


@pytest.fixture(scope="module")
def ray_session():
    import ray

    torch.set_num_threads(TEST_THREADS or 1)
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp: Path, *extra: str):
    return load_config(None, [f"eval.cache_dir={tmp / 'cache'}", f"eval.results_dir={tmp / 'results'}",
                              "tracking.wandb_mode=disabled", *extra])


# ------------------------------------------------------------------------------------------------ the score
def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (7, 40), generator=g).double()  # many ties
    y = x + torch.randn(7, 40, generator=g, dtype=torch.float64) * 2
    ours = spearman(x, y)
    for row in range(7):
        assert float(ours[row]) == pytest.approx(spearmanr(x[row], y[row]).statistic, abs=1e-12)
    assert torch.isnan(spearman(torch.ones(5), torch.arange(5.0)))  # constant: undefined, not 0


def test_group_effect_sums_over_removed_examples():
    """Γ_j = Σ_{m ∉ S_j} τ_m: with τ = e_m the group effect is the removed indicator itself."""
    kept = [torch.tensor([0, 2]), torch.tensor([1, 2, 3])]
    removed = removed_mask(kept, 4)
    assert removed.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    measured = torch.tensor([[1.0], [0.0]])  # subset 0 (2 removed) measured higher
    scores = torch.ones(1, 4)
    assert float(lds_per_query(scores, removed, measured)[0]) == pytest.approx(1.0)


def test_ground_truth_leaves_diverged_runs_out():
    ok = lambda v: {"diverged": False, "measurements": v, "seconds": 1.0}  # noqa: E731
    bad = {"diverged": True, "measurements": None, "seconds": 1.0}
    records = {(0, 0): ok([1.0, 2.0]), (0, 1): bad, (1, 0): bad, (1, 1): bad, (2, 0): ok([3.0, 4.0]),
               (2, 1): ok([5.0, 6.0])}
    truth = ground_truth(records, 3, 2)
    assert truth.subsets == [0, 2] and truth.num_diverged == 3 and truth.num_subsets_dropped == 1
    assert truth.measured.tolist() == [[1.0, 2.0], [4.0, 5.0]]


# ------------------------------------------------------------------------------------------------ known answer
def test_ridge_lds_known_answer_cache_and_resume(ray_session, tmp_path):
    """Ridge in closed form: EK-FAC is the exact GGN and λ the ridge, so EK-FAC-IF is the exact IF: LDS ≥ 0.95.
    Summing over the KEPT examples instead gives the opposite sign (seeds §13.1)."""
    cfg = _cfg(tmp_path, "eval.num_subsets=100", "eval.num_retrain_seeds=1", "eval.ensemble_size=1")
    result = run_lds(cfg, "ridge", ["ekfac", "graddot"])
    rows = {r.method: r for r in result.rows}
    assert result.trained_now == 101 and result.num_diverged == 0
    assert rows["ekfac"].single_mean >= 0.95 and rows["ekfac"].num_queries == 100
    assert rows["graddot"].single_mean < rows["ekfac"].single_mean

    task = build_task("ridge", tmp_path / "cache" / "data")
    cache = RetrainCache(tmp_path / "cache", task, 0.5, 0)
    truth = ground_truth({(j, 0): cache.load_record(j, 0) for j in range(100)}, 100, 1)
    kept_mask = 1.0 - removed_mask([cache.retrain_job(j, 0).train_index for j in range(100)], task.num_train)
    scores = METHODS["ekfac"].score(ModelAttribution(task, cache.load_model(0), 0), MethodSettings(cfg, 1.0))
    assert float(lds_per_query(scores, kept_mask, truth.measured).mean()) <= -0.95

    again = run_lds(cfg, "ridge", ["ekfac"])
    assert again.trained_now == 0 and again.rows[0].single_mean == rows["ekfac"].single_mean
    for j in (3, 50, 99):  # an interrupted run: only the missing results are retrained
        cache.retrain_job(j, 0).path.unlink()
    assert run_lds(cfg, "ridge", ["ekfac"]).trained_now == 3
    record = json.loads(cache.retrain_job(3, 0).path.read_text())
    assert record["diverged"] is False and len(record["measurements"]) == task.num_queries
    assert not list(cache.root.rglob("*.tmp-*"))  # atomic writes leave no temporary files


def test_diverged_training_is_reported(ray_session, tmp_path):
    """A recipe whose SGD blows up: the model trained on all data (needed for attribution) is an error naming the
    seed and the loss; diverged subset retrainings are recorded (and never retried), as in the unit test above."""
    cfg = _cfg(tmp_path, "eval.num_subsets=3", "eval.num_retrain_seeds=1", "eval.ensemble_size=1",
               "eval.recipe={lr: 1.0e+6, epochs: 2}")
    with pytest.raises(DastraError, match=r"model with seed 0 \(trained on all data\) diverged \(final loss nan\)"):
        run_lds(cfg, "diabetes", ["graddot"])
    records = sorted((tmp_path / "cache").rglob("s000*-r00.json"))
    assert records and all(json.loads(p.read_text())["diverged"] for p in records)
    cache = RetrainCache(tmp_path / "cache", build_task("diabetes", tmp_path, {"lr": 1e6, "epochs": 2}), 0.5, 0)
    assert not cache.model_job(0).path.exists()


# ------------------------------------------------------------------------------------------------ bad input, CLI
def test_unknown_names_list_the_valid_ones(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(DastraError, match="valid tasks: digits, diabetes, gpt2, ridge"):
        run_lds(cfg, "mnist", ["ekfac"])
    with pytest.raises(DastraError, match="valid methods: graddot, tracin, trak, ekfac, sni, astra"):
        run_lds(cfg, "digits", ["ekfac", "kfac"])
    with pytest.raises(DastraError, match="eval.recipe.depth: .* valid: widths"):
        build_task("digits", tmp_path, {"depth": 3})


def test_cli_eval_lds_writes_results_and_logs_offline(ray_session, tmp_path):
    args = ["eval", "lds", "--task", "ridge", "--methods", "graddot,ekfac,trak"]
    sets = [f"eval.cache_dir={tmp_path / 'cache'}", f"eval.results_dir={tmp_path / 'results'}",
            "eval.num_subsets=20", "eval.num_retrain_seeds=1", "eval.ensemble_size=2", "tracking.wandb_mode=offline"]
    result = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "results" / "lds.md").read_text()
    assert "### ridge" in text and "| EK-FAC-IF |" in text and "<!-- analysis -->" in text
    assert (tmp_path / "results" / "lds.png").stat().st_size > 1000
    stored = json.loads((tmp_path / "results" / "lds.json").read_text())["tasks"]["ridge"]
    assert {r["method"] for r in stored["rows"]} == {"graddot", "ekfac", "trak"}
    (run_dir,) = (tmp_path / "cache" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)
    ekfac = next(r for r in stored["rows"] if r["method"] == "ekfac")
    assert logged.summary["lds/ridge/ekfac/single"] == pytest.approx(ekfac["single_mean"])
    assert logged.series("lds/ridge/ekfac/scale10/ensemble") == [pytest.approx(ekfac["ensemble_mean"])]

    bad = CliRunner().invoke(app, ["eval", "lds", "--task", "ridge", "--methods", "nope"])
    assert bad.exit_code == 2 and "valid methods" in bad.output


def test_cached_scores_keep_the_seconds_they_took(tmp_path):
    """A re-run reads the scores and their original compute time (the table's "seconds" column), not 0."""
    path = tmp_path / "m-model00.pt"

    def compute():
        time.sleep(0.05)
        return torch.arange(6.0).reshape(2, 3)

    scores, seconds = _cached_scores(path, compute)
    again, seconds_again = _cached_scores(path, lambda: pytest.fail("the cache was not used"))
    assert torch.equal(again, scores) and seconds >= 0.05 and seconds_again == seconds


# ------------------------------------------------------------------------------------------------ solver settings
def _facts_solvers(cfg) -> dict:
    """The SolverConfig `dastra eval facts` solves each method with (`eval.facts.fact_solver`, mean(Λ) = 2)."""
    from distributed_astra.eval import facts

    return {method: facts.fact_solver(cfg, method, lambda: 2.0) for method in ("graddot", "ekfac", "sni", "astra")}


def test_eval_lds_and_eval_facts_share_one_solver_function(tmp_path):
    """`eval lds` and `eval facts` take their solver settings from config.eval_solver, on the same config: one
    `--set eval.solver.iterations=7` reaches both, over the run's solver.iterations (20 in configs/tiny.yaml)."""
    from distributed_astra import config
    from distributed_astra.eval import facts, methods

    assert facts.eval_solver is methods.eval_solver is config.eval_solver
    cfg = _cfg(tmp_path, "eval.solver.iterations=7", "eval.solver.patience=3")
    assert cfg.solver.iterations == 20
    settings = MethodSettings(cfg, 10.0)
    lds = {"astra": methods.solver_config(settings, "astra"), "sni": methods.solver_config(settings, "sni", 3.0, 1.0)}
    fact = _facts_solvers(cfg)
    for solver in [*lds.values(), *fact.values()]:
        assert (solver.iterations, solver.minibatch_size, solver.patience) == (7 if solver.iterations else 0, 64, 3)
    assert fact["graddot"].iterations == 0  # grad-dot is SNI with x = ∇f, whatever eval.solver says
    # the same settings but for what each command sets per method: the LDS's SNI step, facts' λ = 10 × mean(Λ)
    assert fact["astra"].model_dump() == {**lds["astra"].model_dump(), "damping": 20.0}
    assert lds["sni"].lr == pytest.approx(1.0 / 4.0) and lds["sni"].lr_mode == "absolute"
    assert fact["sni"].lr == lds["astra"].lr == 0.01


def test_default_eval_solver_is_the_harness_settings_it_replaced(tmp_path):
    """The LDS's defaults are what it ran with before `eval.solver` (200 it, ℬ 64, absolute α = 0.01, momentum 0.9,
    ×0.5 every 50, no early stop; SNI α = sni_lr / (σ_max + λ)): the same SolverConfig, so the same LDS numbers, and
    the same score-cache keys, so cached scores are reused."""
    import hashlib

    from distributed_astra.config import SolverConfig
    from distributed_astra.eval.lds import _settings_hash
    from distributed_astra.eval.methods import get_method, solver_config

    settings = MethodSettings(_cfg(tmp_path), 10.0)
    old = {"momentum": 0.9, "lr_decay": 0.5, "lr_decay_every": 50, "iterations": 200, "minibatch_size": 64,
           "tolerance": 0.0}
    assert solver_config(settings, "astra") == SolverConfig(name="astra", lr=0.01, lr_mode="absolute", **old)
    assert solver_config(settings, "sni", 3.0, 0.5) == SolverConfig(name="sni", lr=1.0 / 3.5, lr_mode="absolute", **old)
    for name in ("astra", "sni", "graddot"):
        method = get_method(name)
        relevant = {"method": name, "solver": [200, 64, 0.01, 1.0, 0.9, 0.5, 50], "trak_dim": 256}
        if method.uses_damping:
            relevant["damping_scale"] = 10.0
        assert _settings_hash(method, settings) == hashlib.sha256(
            json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
    assert _settings_hash(get_method("astra"), MethodSettings(_cfg(tmp_path, "eval.solver.patience=3"), 10.0)) != \
        _settings_hash(get_method("astra"), settings)


def test_eval_solver_keys_are_checked_against_the_solver(tmp_path):
    with pytest.raises(DastraError, match=r"unknown key 'eval\.solver\.iteration'"):
        _cfg(tmp_path, "eval.solver.iteration=7")
    with pytest.raises(DastraError, match=r"unknown key 'eval\.solver\.damping'"):  # λ: eval.damping_scale
        _cfg(tmp_path, "eval.solver.damping=0.1")
    with pytest.raises(DastraError, match=r"eval\.solver\.minibatch_size: Input should be greater than 0"):
        _cfg(tmp_path, "eval.solver.minibatch_size=0")
    with pytest.raises(DastraError, match=r"unknown key 'eval\.iterations'"):  # the old shadow of solver.iterations
        _cfg(tmp_path, "eval.iterations=7")
    from distributed_astra.config import eval_solver

    # null hands a key back to the run's solver section
    assert eval_solver(_cfg(tmp_path, "eval.solver.iterations=null")).iterations == 20
