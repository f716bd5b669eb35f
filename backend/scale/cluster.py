"""Ray for the ``--ray`` runs: importing it, joining a cluster, sizing the actor pool, running
one pipeline.

Ray is an optional extra (``pip install "ovss-label[ray]"``), imported here only when a run
starts: without it, :func:`import_ray` raises :class:`RayUnavailableError` with the install
line, and nothing else in ``ovss-label`` needs it.

**The cluster** is ``RAY_ADDRESS`` when set (a cluster started with ``ray start --head``),
else a local Ray on this machine, started for the run and shut down after it. A process that
already called ``ray.init`` (a test, a notebook) keeps its Ray.

**One pipeline** (:func:`run_pipeline`), in Ray Data's streaming executor (its progress bars
are the run's progress): the work list (small dicts, made by the driver) → decode in CPU tasks
→ a model in an actor pool (one model per actor, loaded once) → post-process in CPU tasks →
small rows back to the driver. A failure of one image travels in its row (``error``,
``transient``), never as an exception: the run goes on.

**Sizing** (:func:`plan_pool`): with ``--device cuda`` one actor per GPU, each asking for one;
on CPUs one actor per 4 CPUs with the CPUs split between them as torch threads. Whatever the
actors ask for leaves one CPU to the tasks: on a node full of actors a decode task could never
start and the run would stall (Ray Data waits for CPUs, it does not preempt actors). An
actor's CPU request is bookkeeping for Ray's scheduler; its torch thread count is set
explicitly.

**Workers** get the driver's ``OVSS_*`` variables (``runtime_env``), so they resolve weights
as the driver does: the weight files must be at the same paths on every node (a shared
filesystem, or the same image with the same cache). An actor whose model differs from the
driver's (another file, another version) refuses to start, naming both.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = (
    'Ray is not installed: pip install "ovss-label[ray]" (in a checkout: pip install -e ".[ray]")'
)
TASK_CPUS = 1.0
"""CPUs a decode or post-processing task asks for (and what the actors leave free)."""
CPUS_PER_ACTOR = 4
"""On CPU clusters, one actor per this many CPUs by default (a model copy each)."""
IMAGES_PER_BLOCK = 4
"""Images per Ray Data block: a block pays a task's fixed cost (scheduling, moving the block,
building the output) once; on 2 cores, one image per block cost a quarter to a third of the
throughput (``bench/scale.py``). Small enough that the actors share the work evenly and a kill
loses little (:func:`block_count`)."""
MAX_BLOCKS = 10_000
"""At most this many blocks (the driver holds one object per block)."""


class RayUnavailableError(RuntimeError):
    """Ray is not installed (the message says how to install it)."""


class RayRunError(RuntimeError):
    """The Ray pipeline itself failed (not one image): a rerun resumes."""


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        RayUnavailableError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(INSTALL_HINT) from exc
    return ray


@contextmanager
def connected() -> Iterator[Any]:
    """Ray, connected (module docstring): ``RAY_ADDRESS``, else a local Ray shut down at the
    end; an already initialised Ray is used and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # no dashboard: it is not needed for progress and costs seconds of CPU to start
        ray.init(address="local", include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class RayOptions:
    """What the command line chose for a Ray run.

    Attributes:
        actors: Actors (model copies); None: from the cluster (:func:`plan_pool`).
        threads: Torch threads per CPU actor; None: the CPUs split between the actors.
        gpu: One GPU per actor (``--device cuda``).
    """

    actors: int | None = None
    threads: int | None = None
    gpu: bool = False


@dataclass(frozen=True)
class Pool:
    """The actor pool of a run.

    Attributes:
        actors: How many.
        threads: Torch threads in each.
        device: Torch device in each (``cuda`` is the GPU Ray gave the actor).
        resources: What each asks Ray for (``num_cpus``, ``num_gpus``).
    """

    actors: int
    threads: int
    device: str
    resources: dict[str, float]


def plan_pool(cluster: Mapping[str, float], options: RayOptions) -> Pool:
    """The actor pool for ``cluster`` (``ray.cluster_resources()``) and ``options`` (module
    docstring, Sizing).

    Raises:
        ValueError: GPUs asked for on a cluster without any; a count below 1.
    """
    cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    if options.gpu and gpus < 1:
        raise ValueError("--device cuda with --ray: the Ray cluster has no GPU")
    if (options.actors or 1) < 1 or (options.threads or 1) < 1:
        raise ValueError("--ray-actors and the thread count must be at least 1")
    spare = max(0.0, cpus - TASK_CPUS)
    default = int(gpus) if options.gpu else max(1, int(cpus // CPUS_PER_ACTOR))
    actors = options.actors or default
    threads = options.threads or max(1, int(spare // actors))
    resources = {"num_cpus": min(float(threads), spare / actors)}
    if options.gpu:
        resources["num_gpus"] = 1.0
    return Pool(actors, threads, "cuda" if options.gpu else "cpu", resources)


def worker_env() -> dict[str, str]:
    """The driver's ``OVSS_*`` variables, for the workers (module docstring)."""
    return {name: value for name, value in os.environ.items() if name.startswith("OVSS_")}


def set_threads(pool: Pool) -> None:
    """In an actor: torch's thread count of a CPU actor (Ray's ``OMP_NUM_THREADS`` follows
    the CPU request, which may be a fraction)."""
    if pool.device == "cpu":
        import torch

        torch.set_num_threads(pool.threads)


def run_pipeline(
    items: list[dict[str, Any]],
    decode: Callable[[dict[str, Any]], dict[str, Any]],
    actor: type,
    actor_args: tuple[Any, ...],
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None,
    pool: Pool,
) -> Iterator[dict[str, Any]]:
    """The rows that come out of decode → ``actor(*actor_args)`` → ``finish`` over ``items``
    (module docstring), in no particular order; call inside :func:`connected`.

    Raises:
        RayRunError: The pipeline failed (a task or an actor could not run).
    """
    ray = import_ray()
    blocks = {_blocks_argument(ray): block_count(len(items), pool.actors)}
    data = ray.data.from_items(items, **blocks).map(decode, num_cpus=TASK_CPUS)
    data = data.map(actor, fn_constructor_args=actor_args,
                    compute=ray.data.ActorPoolStrategy(size=pool.actors),
                    runtime_env={"env_vars": worker_env()}, **pool.resources)  # fmt: skip
    if finish is not None:
        data = data.map(finish, num_cpus=TASK_CPUS)
    try:
        yield from data.iter_rows()
    except ray.exceptions.RayError as exc:
        raise RayRunError(_first_line(exc)) from exc


def block_count(images: int, actors: int) -> int:
    """Blocks for ``images``: :data:`IMAGES_PER_BLOCK` images each, but at least two blocks
    per actor while there are images for them, and at most :data:`MAX_BLOCKS`."""
    wanted = max(-(-images // IMAGES_PER_BLOCK), min(images, 2 * actors))
    return max(1, min(wanted, MAX_BLOCKS))


def cluster_pool(ray: Any, options: RayOptions) -> Pool:
    """:func:`plan_pool` for the connected cluster."""
    return plan_pool(ray.cluster_resources(), options)


def _blocks_argument(ray: Any) -> str:
    # Ray 2.10 renamed from_items' ``parallelism`` to ``override_num_blocks``.
    parameters = inspect.signature(ray.data.from_items).parameters
    return "override_num_blocks" if "override_num_blocks" in parameters else "parallelism"


def _first_line(exc: Exception) -> str:
    """The last non-empty line of a Ray error (its cause: Ray prints the remote traceback
    above it), without the traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
