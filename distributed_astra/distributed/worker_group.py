"""N Ray actors forming one torch.distributed group, each holding the model under a DeepSpeed engine (no optimizer).

    group = WorkerGroup(cfg, model_source)                       # placement group, actors, process group, engines
    results = group.call(rank_fit, corpus, cfg=cfg, what="fit")  # `rank_fit(rank, corpus)` runs on every rank
    group.close()

The pattern is the one OpenRLHF and verl use for DeepSpeed inside Ray: a placement group of N bundles (1 GPU each on
a GPU cluster, CPUs otherwise), one actor per bundle in rank order, rank 0 binds a free port on its node and every
rank joins `tcp://<rank 0 ip>:<port>` (NCCL on GPU, gloo on CPU). torch.distributed is initialised here, before
DeepSpeed, so that `deepspeed.init_distributed` only wraps the existing group; on CPU DeepSpeed's shared-memory
all-reduce op (`deepspeed_shm_comm`, a 65 s JIT build on a fresh machine, used only by `inference_all_reduce`) is
switched off, since every collective of this package goes through torch.distributed.

Loading (ENV.md, "DeepSpeed ZeRO-3 inside Ray actors"): under ZeRO-3 an `HfDeepSpeedConfig` is alive while
`from_pretrained` runs, so the model is built inside `zero.Init` and no rank ever holds it whole. Parameters are
frozen and input embeddings require grad (`prepare_for_attribution`): hooks see ā and Ds, no parameter gradient
exists, and forward/backward are `engine.module(...)` + `autograd.grad` (never `engine(...)`/`engine.backward`).
Tracked modules are chosen on a parameter-free meta copy of the model (a partitioned Conv1D weight has shape (0,)).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

from distributed_astra.config import Config
from distributed_astra.curvature.factors import model_fingerprint
from distributed_astra.distributed.cluster import bundle, dead_actors, note, require_resources, wait_all, worker_env
from distributed_astra.distributed.deepspeed_config import ds_config_path, effective_stage, load_ds_config
from distributed_astra.errors import DastraError, WorkerDied
from distributed_astra.execution import Rank
from distributed_astra.models.load import load_causal_lm, load_tokenizer
from distributed_astra.models.modules import TrackedModule, select_tracked_modules


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _disable_shm_comm() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op (only `inference_all_reduce` uses it)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _meta_tracked(source: str, patterns: list[str]) -> dict[str, TrackedModule]:
    """Tracked modules chosen on a parameter-free (meta device) copy: names and [out, in+1] shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), attn_implementation="eager")
    return select_tracked_modules(meta, patterns)


def gathered_parameters(model: nn.Module) -> Callable[[], Iterator[tuple[str, nn.Parameter]]]:
    """`named_parameters` whose parameters are whole while they are looked at: one at a time under ZeRO-3.

    `GatheredParameters` is a collective: every rank must walk the parameters in the same order.
    """
    import deepspeed

    def named_parameters() -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param

    return named_parameters


class _GatheredView:
    """A stand-in model for `model_fingerprint`: the same parameters, gathered one at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.named_parameters = gathered_parameters(model)


class RankWorker:
    """One rank: a Ray actor holding a torch.distributed rank and a DeepSpeed engine."""

    def __init__(self, rank: int, world_size: int, threads: int) -> None:
        self.rank = rank
        self.world_size = world_size
        torch.set_num_threads(threads)
        self.state: Rank | None = None
        self._engine = None
        self._hf_ds_config = None  # must stay alive while a ZeRO-3 model is built (transformers keeps a weakref)

    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def pid(self) -> int:
        return os.getpid()

    def init_process_group(self, address: str, port: int, backend: str, timeout_s: float) -> None:
        import deepspeed

        os.environ.update(
            MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each actor one visible GPU
        else:
            _disable_shm_comm()
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))

    def load_model(self, cfg: Config, source: str, ds_config: dict) -> dict[str, Any]:
        """Build the engine for `ds_config` (replacing any previous one); report sizes and the model fingerprint."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.state, self._engine, self._hf_ds_config = None, None, None
        stage = int(ds_config["zero_optimization"]["stage"])
        tracked = _meta_tracked(source, cfg.model.tracked_modules)
        if stage == 3:
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = load_causal_lm(source, None, cfg.model.dtype)
        if cfg.ray.use_gpu and stage != 3:  # zero.Init already put the partitions on the rank's GPU
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self._engine = engine
        module = engine.module
        modules = dict(module.named_modules())
        tracked = {name: dataclasses.replace(tm, module=modules[name]) for name, tm in tracked.items()}
        self.state = Rank(
            self.rank, self.world_size, cfg, module, tracked, load_tokenizer(source, None), stage
        )
        params = list(module.parameters())
        if stage == 3:
            local = sum(int(p.ds_tensor.numel()) for p in params)
            full = sum(int(p.ds_numel) for p in params)
            fingerprint = model_fingerprint(_GatheredView(module), tracked)
        else:
            local = full = sum(p.numel() for p in params)
            fingerprint = model_fingerprint(module, tracked)
        return {
            "rank": self.rank,
            "stage": stage,
            "local_parameters": local,  # elements this rank stores (its ZeRO-3 partition)
            "parameters": full,  # elements of the whole model
            "materialised_parameters": sum(p.numel() for p in params),  # whole tensors present now (0 under ZeRO-3)
            "fingerprint": fingerprint,
        }

    def run(self, cfg: Config, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(rank, *args)`: every distributed step is a module-level function run like this on all ranks.

        `cfg` is the driver's config of this step: a group outlives stages (its key is the model and Ray settings),
        so the solver, data and factor settings come with every call, never from the load.
        """
        if self.state is None:
            raise DastraError("internal: the rank has no model loaded")
        self.state.cfg = cfg
        return fn(self.state, *args)


class WorkerGroup:
    """A placement group, N `RankWorker` actors in rank order, their process group, and their engines."""

    def __init__(self, cfg: Config, source: str, expected_fingerprint: str | None = None) -> None:
        self.cfg = cfg
        self.source = source
        rc = cfg.ray
        require_resources(rc, "the DeepSpeed worker group")
        self.placement_group = placement_group([bundle(rc)] * rc.num_workers, strategy="PACK")
        self.actors: list[ray.actor.ActorHandle] = []
        try:
            wait_all([self.placement_group.ready()], rc.connect_timeout_s, "placing the worker group")
            remote = ray.remote(RankWorker)
            env = {"env_vars": worker_env(rc)}
            for rank in range(rc.num_workers):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
                self.actors.append(
                    remote.options(
                        num_cpus=rc.cpus_per_worker, num_gpus=1 if rc.use_gpu else 0, scheduling_strategy=strategy,
                        runtime_env=env,
                    ).remote(rank, rc.num_workers, rc.cpus_per_worker)
                )
            address, port = wait_all([self.actors[0].master_address.remote()], rc.timeout_s, "starting rank 0")[0]
            backend = "nccl" if rc.use_gpu else "gloo"
            wait_all(
                [a.init_process_group.remote(address, port, backend, rc.timeout_s) for a in self.actors],
                rc.timeout_s, "joining the torch.distributed group",
            )
            self.pids = wait_all([a.pid.remote() for a in self.actors], rc.timeout_s, "starting the ranks")
            self.stage = -1
            self.reports = self.load(cfg, expected_fingerprint)
        except BaseException:
            self.close()
            raise

    def load(self, cfg: Config, expected_fingerprint: str | None = None) -> list[dict[str, Any]]:
        """(Re)load the model on every rank under `cfg.deepspeed`; checks the ranks' fingerprint when one is given."""
        ds_config = load_ds_config(cfg)
        if cfg.deepspeed.stage in (1, 2):
            note(
                f"deepspeed.stage {cfg.deepspeed.stage} shards only optimizer state and gradients, which attribution "
                "does not have: the engines run as stage 0 (replicated parameters)"
            )
        reports = wait_all(
            [a.load_model.remote(cfg, self.source, ds_config) for a in self.actors],
            cfg.ray.timeout_s, f"loading the model under {ds_config_path(cfg).name}",
        )
        fingerprints = {r["fingerprint"] for r in reports}
        if len(fingerprints) != 1 or (expected_fingerprint and fingerprints != {expected_fingerprint}):
            raise DastraError(
                f"the ranks loaded a model whose weights differ from the driver's ('{self.source}'): "
                "make model.path the same folder on every node"
            )
        self.cfg, self.stage, self.reports = cfg, effective_stage(cfg.deepspeed.stage), reports
        return reports

    def call(self, fn: Callable[..., Any], *args: Any, cfg: Config, what: str) -> list[Any]:
        """`fn(rank, *args)` on every rank (same arguments) under the step's `cfg`; results in rank order.

        Arguments go through the object store once (`ray.put`), however many ranks read them. A failure with a
        rank dead raises `WorkerDied` (the survivors' errors are only their lost peer).
        """
        refs = [a if isinstance(a, (str, int, float, bool, type(None))) else ray.put(a) for a in args]
        step = ray.put(cfg)
        try:
            return wait_all([a.run.remote(step, fn, *refs) for a in self.actors], cfg.ray.timeout_s, what)
        except WorkerDied:
            raise
        except DastraError as exc:
            dead = dead_actors(self.actors, cfg.ray.connect_timeout_s)
            if dead:
                raise WorkerDied(f"{what}: rank(s) {dead} died") from exc
            raise

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
