"""The Ray side of a distributed run: connect to a cluster (or start an embedded one), check resources, wait safely.

    with ray_session(cfg.ray):                       # ray.address set: connect; null: embedded Ray on 127.0.0.1
        require_resources(cfg.ray, what="fit")       # more workers than CPUs/GPUs -> DastraError, not a hang
        results = wait_all([...refs], cfg.ray.timeout_s, "fit")

Every `ray.get` of this package goes through `wait_all`, which turns a timeout or a dead actor into a one-line
`DastraError` naming the stage and the setting to change (`WorkerDied` for a dead actor: the caller may retry).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from distributed_astra.config import RayConfig
from distributed_astra.errors import DastraError, WorkerDied
from distributed_astra.progress import console

# Environment that every actor needs: one BLAS thread per CPU bundle, offline hubs, DeepSpeed's CPU accelerator when
# the driver uses it. Passed explicitly so that actors on other nodes of a real cluster see the same settings.
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR", "WANDB_MODE")


def _unreachable(address: str, timeout: float) -> str | None:
    """Why a TCP connection to `host:port` (a GCS address) does not open within `timeout` seconds, or None when it
    does: a refused connection (nothing listens there) is told apart from no answer and from an unknown host."""
    host, _, port = address.partition("://")[2 if "://" in address else 0].rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto" and the like: let ray.init resolve them
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return f"connection refused at {host}:{port}, nothing listens there"
    except socket.timeout:
        return f"no answer from {host}:{port} within {timeout:g} s (ray.connect_timeout_s)"
    except socket.gaierror as exc:
        return f"host '{host}' is unknown ({exc.strerror or exc})"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def connect(cfg: RayConfig) -> bool:
    """Join `cfg.address` or start an embedded local Ray; returns True when this call started Ray (and owns it).

    An unreachable address fails within `cfg.connect_timeout_s` (the TCP probe), instead of Ray's own retries.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep an embedded Ray on 127.0.0.1
    if cfg.address:
        reason = _unreachable(cfg.address, cfg.connect_timeout_s)
        if reason is not None:
            port = cfg.address.rpartition(":")[2]
            raise DastraError(
                f"ray.address '{cfg.address}' is not reachable ({reason}): start Ray there with "
                f"`ray start --head --port {port}`, or set ray.address: null for an embedded local Ray"
            )
        try:
            ray.init(address=cfg.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DastraError(f"ray.address '{cfg.address}': could not join the cluster ({exc})") from None
        return True
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    return True


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Ray for the duration of the block; shut down on exit only when this block started it."""
    owned = connect(cfg)
    try:
        yield
    finally:
        if owned:
            shutdown()


def bundle(cfg: RayConfig) -> dict[str, float]:
    """The resources of one worker: `cpus_per_worker` CPUs, plus one GPU when `use_gpu`."""
    return {"CPU": float(cfg.cpus_per_worker), **({"GPU": 1.0} if cfg.use_gpu else {})}


def require_resources(cfg: RayConfig, what: str, wait_s: float = 15.0) -> None:
    """Raise when the cluster cannot place `num_workers` bundles (Ray would wait forever instead).

    Resources that exist but are still held (actors just killed release theirs asynchronously) are waited for up
    to `wait_s` seconds.
    """
    deadline = time.monotonic() + wait_s
    while True:
        available, total = ray.available_resources(), ray.cluster_resources()
        short = [
            (resource, amount * cfg.num_workers, available.get(resource, 0.0), total.get(resource, 0.0))
            for resource, amount in bundle(cfg).items()
            if available.get(resource, 0.0) + 1e-9 < amount * cfg.num_workers
        ]
        if not short:
            return
        resource, need, have, in_total = short[0]
        if in_total + 1e-9 < need or time.monotonic() > deadline:
            raise DastraError(
                f"ray.num_workers={cfg.num_workers} ({what}) needs {need:g} {resource} but the cluster has {have:g} "
                f"free ({in_total:g} in total): lower ray.num_workers or ray.cpus_per_worker"
                + (", or set ray.use_gpu=false" if resource == "GPU" else "")
            )
        time.sleep(0.2)


def worker_env(cfg: RayConfig) -> dict[str, str]:
    """Environment variables of every actor (runtime_env)."""
    threads = str(max(1, int(cfg.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in _PASSED_ENV if k in os.environ})
    return env


def wait_all(refs: Sequence[ray.ObjectRef], timeout_s: float, what: str) -> list[Any]:
    """`ray.get` of every ref with one deadline; a timeout or a dead actor becomes a DastraError naming `what`."""
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for ref in refs:
            results.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
    except GetTimeoutError:
        raise DastraError(
            f"{what}: no answer from the Ray workers within ray.timeout_s={timeout_s:g} s; raise ray.timeout_s "
            "or check the workers' logs (a collective waits for every rank)"
        ) from None
    except RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if isinstance(cause, DastraError):
            raise DastraError(str(cause)) from None
        raise DastraError(f"{what}: a Ray worker failed: {str(exc).strip().splitlines()[-1]}") from None
    except RayActorError as exc:
        raise WorkerDied(f"{what}: a Ray worker died ({type(exc).__name__}); see its log under /tmp/ray") from None
    return results


def dead_actors(actors: Sequence[ray.actor.ActorHandle], timeout_s: float) -> list[int]:
    """The positions of the actors whose process is gone (their `pid` method raises): after a failed collective,
    tells a rank that died from the ranks that only lost their peer. One still busy past `timeout_s` is alive."""
    dead = []
    for i, actor in enumerate(actors):
        try:
            ray.get(actor.pid.remote(), timeout=timeout_s)
        except RayActorError:
            dead.append(i)
        except GetTimeoutError:
            pass
    return dead


def note(message: str) -> None:
    """A one-line note on the console (the driver's only channel besides metrics)."""
    console.print(f"[cyan]note:[/] {message}", highlight=False)
