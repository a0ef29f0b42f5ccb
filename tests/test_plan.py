"""The planner: exact byte accounting of the meta replay, closed-form sizes, the fit search, GPT-2 XL's shapes and
config, `dastra plan`, and `dastra run` refusing a config that does not fit before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distributed_astra.cli import app
from distributed_astra.config import load_config
from distributed_astra.errors import DastraError
from distributed_astra.ihvp.solvers import LIVE_VECTORS_PER_QUERY
from distributed_astra.models.load import prepare_for_attribution
from distributed_astra.models.modules import select_tracked_modules
from distributed_astra.plan import check_fits, does_not_fit, make_plan, parse_memory, shapes, simulate
from distributed_astra.plan.estimate import GIB, ZERO3_PREFETCH_ELEMENTS
from distributed_astra.scoring.projection import KroneckerProjection
from distributed_astra.stages.score import query_chunks

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.tiny.vocab_size=300", "model.tiny.n_layer=2", "model.tiny.n_embd=32", "model.tiny.n_head=2",
        "data.max_length=32", "plan.gpu_memory=1GB", "solver.name=astra"]


def test_parse_memory_units_and_bad_input():
    assert parse_memory("80GB") == 80 * GIB == parse_memory("80 GiB") == parse_memory("80g")
    assert parse_memory("512MB") == 512 << 20 and parse_memory("1.5T") == int(1.5 * (1 << 40))
    with pytest.raises(DastraError, match="plan.gpu_memory: 'lots' is not a memory size"):
        parse_memory("lots")


def test_live_bytes_counts_the_high_water_mark_of_storages():
    live = simulate.LiveBytes()
    with live:
        a = torch.zeros(1000, device="meta")  # 4000 B
        b = a * 2  # 8000 live
        view = b[:10]  # a view: no new storage
        del a
        c = b + 1  # 8000 live again, peak still 8000
        del b, view, c
        d = torch.zeros(3000, device="meta")  # 12000: the new peak
        del d
    assert live.peak == 12000 and live.live == 0


def test_meta_replay_allocates_what_the_same_step_allocates_on_cpu(tiny_gpt2_factory):
    """The replay on meta tensors reports the very bytes the step allocates with real tensors."""
    cpu = prepare_for_attribution(tiny_gpt2_factory(n_embd=16, n_layer=2, dtype=torch.float32))
    meta = shapes.meta_model(cpu.config, "float32")
    peaks = []
    for model, device in ((cpu, "cpu"), (meta, "meta")):
        tracked = select_tracked_modules(model, ["transformer.h.*.mlp.*", "transformer.h.*.attn.c_attn"])
        ids = torch.randint(2, 60, (3, 12), device=device) if device == "cpu" else torch.zeros(3, 12, dtype=torch.long, device="meta")
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        peaks.append(simulate.measure(
            lambda: simulate.covariance_step(model, tracked, batch, torch.float64, torch.float32)
        ).peak_bytes)
    assert peaks[0] == peaks[1] > 0


def test_tiny_plan_sizes_match_closed_forms_and_the_largest_batch_fits_exactly():
    cfg = load_config(None, TINY)
    plan = make_plan(cfg)
    model = shapes.meta_model(shapes.model_config(cfg), "float32")
    tracked = shapes.tracked_modules(model, cfg)
    stages = {s.stage.split(" (")[0]: s for s in plan.stages}
    factor_bytes = sum(8 * (t.in_dim**2 + t.out_features**2) for t in tracked.values())  # float64 statistics
    assert stages["covariances"].resident == factor_bytes
    eigenvalues = sum(8 * (t.in_dim + t.out_features) for t in tracked.values())  # d_A, d_S next to Q_A, Q_S
    assert stages["eigenvalue correction"].resident == factor_bytes + eigenvalues + 8 * plan.tracked_parameters
    assert plan.tracked_parameters == sum((t.in_features + 1) * t.out_features for t in tracked.values())
    assert stages["astra chunk"].resident == (
        factor_bytes + eigenvalues
        + 8 * plan.tracked_parameters * (1 + LIVE_VECTORS_PER_QUERY * cfg.solver.query_batch_size)
    )
    params = sum(p.numel() for p in model.parameters())
    assert plan.num_parameters == params and plan.zero_parameters[0] == 4 * params
    assert all(s.per_gpu <= plan.budget for s in plan.stages) and plan.fits
    assert plan.budget == int(1 * GIB * 0.9)

    # the largest micro-batch fits the budget and one more does not
    largest = plan.max_micro_batch["scoring.batch_size"]
    at = {b: make_plan(load_config(None, TINY + [f"scoring.batch_size={b}"]), search=False) for b in (largest, largest + 1)}
    assert at[largest].fits and not at[largest + 1].fits



def test_store_size_uses_the_projection_the_index_stage_builds():
    """The planner's store width equals the width of the real KroneckerProjection (per-module globs, sides capped)."""
    overrides = TINY + ["projection.out_dim=8", "projection.in_dim=64", "index.store_dtype=float32",
                        "plan.documents=1000"]
    cfg = load_config(None, overrides + ['projection.per_module={"*.attn.c_attn": [4, 4]}'])
    plan = make_plan(cfg, search=False)
    model = shapes.meta_model(shapes.model_config(cfg), "float32")
    tracked = shapes.tracked_modules(model, cfg)
    projection = KroneckerProjection.for_modules(
        {name: t.shape for name, t in tracked.items()}, 8, 64, {"*.attn.c_attn": (4, 4)}, seed=0
    )
    assert projection.dim < sum(t.shape[0] * t.shape[1] for t in tracked.values())  # a compressive projection
    assert plan.projection_dim == projection.dim
    assert plan.store_bytes == 1000 * projection.dim * 4

def test_zero3_holds_a_shard_plus_the_gathered_working_set():
    cfg = load_config(None, TINY + ["deepspeed.stage=3", "plan.gpus=4"])
    plan = make_plan(cfg, search=False)
    model = shapes.meta_model(shapes.model_config(cfg), "float32")
    params = shapes.parameter_count(model)
    working = min(params, shapes.largest_leaf_parameters(model) + ZERO3_PREFETCH_ELEMENTS)
    assert plan.zero_parameters[3] == min(4 * params, 4 * (math.ceil(params / 4) + working))
    assert plan.zero_parameters[1] == plan.zero_parameters[2] == plan.zero_parameters[0] == 4 * params


def test_gpt2xl_config_loads_with_the_paper_settings_and_the_shipped_model_shapes():
    cfg = load_config(ROOT / "distributed_astra" / "configs" / "gpt2xl.yaml")
    assert (cfg.model.hub_id, cfg.model.dtype, cfg.deepspeed.stage) == ("gpt2-xl", "bfloat16", 3)
    assert all(".mlp." in pattern for pattern in cfg.model.tracked_modules)  # MLP only (seeds §13.7)
    s = cfg.solver
    assert (s.name, s.damping, s.iterations, s.lr, s.lr_mode, s.momentum) == ("astra", 0.011, 300, 1.0, "relative", 0.9)
    assert (s.lr_decay, s.lr_decay_every, s.minibatch_size) == (0.9, 100, 16)  # seeds §10.2, WikiText-2 column
    hf = shapes.model_config(cfg)  # from configs/models/gpt2-xl.json, offline
    assert (hf.n_layer, hf.n_embd, hf.n_head, hf.vocab_size, hf.n_positions) == (48, 1600, 25, 50257, 1024)
    model = shapes.meta_model(hf, cfg.model.dtype)
    assert shapes.parameter_count(model) == 1_557_611_200
    tracked = shapes.tracked_modules(model, cfg)
    assert len(tracked) == 96  # c_fc and c_proj of all 48 blocks
    assert shapes.tracked_parameters(tracked) == 48 * (6400 * 1601 + 1600 * 6401)


def test_hub_id_missing_offline_says_how_to_point_at_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.source=hub", "model.hub_id=no-such-org/no-such-model"])
    with pytest.raises(DastraError, match="not in the local Hugging Face cache: set model.path to a local HF model"):
        make_plan(cfg)


def test_dastra_plan_prints_every_stage_and_writes_markdown(tmp_path):
    out = tmp_path / "plan.md"
    overrides = TINY + ["solver.name=ekfac"]  # the ASTRA chunk's search is covered above
    args = ["plan", "--gpus", "2", "--gpu-mem", "8GB", "--markdown", str(out)] + [a for s in overrides for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for stage in ("covariances", "eigendecomposition", "eigenvalue correction", "query gradients", "scoring"):
        assert stage in result.output and f"| {stage}" in text
    assert "2 GPU(s) on 1 node(s)" in text and "8.0 GiB" in text and "largest micro-batch that fits" in text


def test_dastra_run_refuses_a_config_that_does_not_fit_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "--run-dir", str(run_dir)] + [a for s in TINY + ["plan.gpu_memory=1MB"] for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "memory (GiB) and time per stage" in result.output and "DOES NOT FIT" in result.output
    assert "error: the planner says stage" in result.output
    assert not run_dir.exists()  # nothing was built: no demo corpus, no model, no W&B run
    with pytest.raises(DastraError):
        check_fits(load_config(None, TINY + ["plan.gpu_memory=1MB"]))
    assert check_fits(load_config(None, TINY + ["plan.gpu_memory=1MB", "plan.check=false"])) is None


def test_owned_state_per_gpu_falls_as_one_over_n_with_module_ownership():
    """The fit's factors, the modules-mode ASTRA chunk's state and the modules-mode scoring's directions are the
    busiest owner's (ownership.run_owners): at N GPUs at most 1/N of the one-GPU figure plus the largest module's."""
    cfg = load_config(None, TINY + ["ray.solve_mode=modules", "ray.score_mode=modules", "model.tiny.n_layer=4"])
    model = shapes.meta_model(shapes.model_config(cfg), "float32")
    tracked = shapes.tracked_modules(model, cfg)
    plans = {n: make_plan(cfg, gpus=n, search=False) for n in (1, 4)}
    assert plans[4].busiest_owner_modules < plans[1].busiest_owner_modules == len(tracked)
    assert [s.stage for s in plans[4].stages if s.stage.startswith("astra")] == ["astra chunk (modules)"]
    for stage in ("eigenvalue correction", "astra chunk", "scoring"):  # one GPU: the same state, replicated
        one, four = ({s.stage.split(" (")[0]: s.resident for s in plans[n].stages}[stage] for n in (1, 4))
        per_module = one / plans[1].tracked_parameters * max(t.shape[0] * t.shape[1] for t in tracked.values())
        assert 0 < four <= one / 4 + 2 * per_module < one, (stage, one, four)
    assert (plans[1].score_mode, plans[4].score_mode) == ("replicas", "modules")


def test_scoring_directions_in_low_rank_and_bfloat16_are_their_closed_forms():
    """scoring.direction_rank r and direction_dtype: the scoring stage holds Q·r·(out + in+1) numbers per module
    (r capped at the module's rank) in 2 or 4 bytes; whole float32 directions Q·D·4."""
    queries = make_plan(load_config(None, TINY), search=False).num_queries
    model = shapes.meta_model(shapes.model_config(load_config(None, TINY)), "float32")
    tracked = shapes.tracked_modules(model, load_config(None, TINY))
    for rank, dtype, itemsize in ((None, "float32", 4), (None, "bfloat16", 2), (8, "float32", 4), (8, "bfloat16", 2)):
        plan = make_plan(load_config(None, TINY + [f"scoring.direction_rank={rank or 'null'}",
                                                   f"scoring.direction_dtype={dtype}"]), search=False)
        numbers = sum(min(rank, *t.shape) * sum(t.shape) if rank else t.shape[0] * t.shape[1]
                      for t in tracked.values())
        assert {s.stage: s.resident for s in plan.stages}["scoring"] == queries * numbers * itemsize
        assert plan.scoring_passes == 1


def test_bfloat16_state_holds_the_query_gradients_and_solver_vectors_in_two_bytes():
    """solver.state_dtype=bfloat16: the query stage keeps Q·D numbers in 2 bytes instead of factors.dtype's 8 (tiny:
    float64 statistics), the ASTRA chunk its LIVE_VECTORS_PER_QUERY vectors per query; the factors do not change."""
    plans = {dtype: make_plan(load_config(None, TINY + [f"solver.state_dtype={dtype}"]), search=False)
             for dtype in ("factors", "bfloat16")}
    wide, half = ({s.stage.split(" (")[0]: s for s in plans[dtype].stages} for dtype in ("factors", "bfloat16"))
    d, queries = plans["factors"].tracked_parameters, plans["factors"].num_queries
    chunk = min(load_config(None, TINY).solver.query_batch_size, queries)
    assert wide["query gradients"].resident - half["query gradients"].resident == (8 - 2) * queries * d
    assert wide["astra chunk"].resident - half["astra chunk"].resident == (8 - 2) * LIVE_VECTORS_PER_QUERY * chunk * d
    assert wide["eigenvalue correction"].resident == half["eigenvalue correction"].resident


def test_queries_per_pass_holds_that_many_directions_and_multiplies_the_scoring_time():
    """scoring.queries_per_pass: the scoring stage holds one chunk's directions, and its time is the passes over the
    corpus (stages/score.py's query_chunks) times one pass's."""
    whole = make_plan(load_config(None, TINY), search=False)
    queries = whole.num_queries
    assert queries >= 3
    per_pass = queries // 2
    chunked = make_plan(load_config(None, TINY + [f"scoring.queries_per_pass={per_pass}"]), search=False)
    assert chunked.scoring_passes == len(query_chunks(queries, per_pass)) == -(-queries // per_pass)
    one, several = ({s.stage: s for s in p.stages}["scoring"] for p in (whole, chunked))
    assert several.resident * queries == one.resident * per_pass
    explicit = make_plan(load_config(None, TINY + [f"scoring.queries_per_pass={queries}"]), search=False)
    assert {s.stage: s for s in explicit.stages}["scoring"].seconds == one.seconds and explicit.scoring_passes == 1
    # every pass forwards the whole corpus again and scores fewer queries than the one pass of them all
    assert one.seconds < several.seconds < one.seconds * chunked.scoring_passes


def test_dastra_plan_json_is_the_table_as_one_object():
    overrides = TINY + ["plan.gpus=2"]
    result = CliRunner().invoke(app, ["plan", "--json"] + [a for s in overrides for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    expected = make_plan(load_config(None, overrides))
    assert [s["stage"] for s in got["stages"]] == [s.stage for s in expected.stages]
    assert [s["bytes_per_gpu"] for s in got["stages"]] == [s.per_gpu for s in expected.stages]
    assert got["fits"] is expected.fits is True and got["failing"] == [] and got["gpus"] == 2
    assert got["max_query_chunk"] == expected.max_query_chunk


def test_a_module_too_large_for_one_gpu_is_named_with_the_fix():
    """Module ownership cannot split a module: when the busiest owner holds one module and a stage it owns does
    not fit, the error names that module and the stage, and says that more GPUs will not help."""
    cfg = load_config(None, TINY + ['model.tracked_modules=["transformer.h.0.mlp.c_fc"]', "plan.gpus=4",
                                    "plan.gpu_memory=1MB", "ray.solve_mode=modules"])
    plan = make_plan(cfg, search=False)
    assert plan.busiest_owner == ["transformer.h.0.mlp.c_fc"] and not plan.fits
    message = str(does_not_fit(plan))
    assert "transformer.h.0.mlp.c_fc, which more GPUs cannot split" in message
    assert all(fix in message for fix in ("model.tracked_modules", "scoring.direction_dtype", "solver.state_dtype"))
    many = make_plan(load_config(None, TINY + ["plan.gpus=1", "plan.gpu_memory=1MB"]), search=False)
    assert many.busiest_owner_modules > 1 and "add GPUs" in str(does_not_fit(many))
