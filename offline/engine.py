"""Where offline work runs: map a function over work items and stream the results back as they complete.

The offline job's per-item work (one expert per task; one score per (expert, task) pair for transfer
measurements) is embarrassingly parallel. This module is the one place that decides *where* it runs:

    from offline.engine import make_engine

    with make_engine("ray", address=None, num_cpus=1, num_gpus=0.25) as engine:   # or make_engine("local")
        for key, result in engine.map(score, items, shared=prepared, desc="transfer"):
            ...   # (key, fn's return value), as each item completes

Contract
--------
- ``fn(shared, item) -> result`` is a module-level function (Ray workers import it by name; lambdas and
  closures are not shipped). It must not rely on state of the calling process other than ``shared``.
- ``items`` is an iterable of ``(key, item)``; ``key`` is a short string naming the item (progress, errors).
  It is consumed lazily: the Ray engine keeps at most ``max_in_flight`` items submitted (default: twice what
  the cluster can run at once), so a generator of large items never sits in the object store all at once.
  ``total`` (default ``len(items)`` when it has one) sizes the progress bar.
- ``shared`` is what every item needs and is the same for all (prepared base weights, configs, an index):
  prepared once by the caller and handed to the engine once. The local engine passes the object itself; the
  Ray engine puts it into the object store once (``ray.put``) and every task receives the same reference, so
  it is never serialised per task. Keep ``shared``, items and results plain data (numbers, strings, bytes,
  numpy arrays, dicts/lists of those): numpy arrays travel through Ray's object store without copies.
- Results stream: ``map`` is a generator that yields ``(key, result)`` as soon as an item finishes (local: in
  input order; Ray: in completion order), so the caller can persist each one at once (an interrupted run
  keeps what it finished; a re-run can skip it). A progress bar counts completed items.
- Failures: an exception raised by ``fn`` is not retried; it cancels the items still pending and is raised
  from ``map`` (as ``EngineTaskError`` naming the key). A Ray worker process that dies mid-item (killed,
  OOM, node lost) is a system failure: Ray re-runs that item up to ``max_retries`` times.
- Threads: ``map(..., threads=n)`` runs every item with ``n`` CPU threads (offline/threads.py), on either engine,
  so an item's floats do not depend on where it ran (Ray's workers default to one thread, this process to all).
- Resources: ``num_cpus`` / ``num_gpus`` are Ray's per-task shares (fractions allowed: 0.25 GPU packs four
  tasks on one GPU); the local engine runs one item at a time in this process and ignores them.

The Ray engine is optional (``pip install 'sglora[ray]'``): it imports ray only when made. It joins the
cluster at ``address`` (``ray://`` or ``host:port``; ``"auto"`` finds a running local cluster) or, with no
address, starts a local Ray with ``num_cpus`` CPUs for the duration of the ``with`` block. No scheduling is
done here: Ray places, retries and tracks the tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tqdm import tqdm

from offline.threads import fixed_threads

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


class EngineTaskError(RuntimeError):
    """An item's function raised; ``key`` names the item."""

    def __init__(self, key: str, cause: BaseException):
        super().__init__(f"work item {key!r} failed: {type(cause).__name__}: {cause}")
        self.key = key


@dataclass(frozen=True)
class TaskResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3  # re-runs of an item whose worker process died (system failures only)


class LocalEngine:
    """Items one after another in this process: the default, and what tests and a laptop use."""

    name = "local"

    def __init__(self, resources: TaskResources | None = None):
        self.resources = resources or TaskResources()

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[tuple[str, Any]], shared: Any = None,
            desc: str = "items", progress: bool = True, total: int | None = None,
            threads: int = 1) -> Iterator[tuple[str, Any]]:
        with tqdm(total=_total(items, total), desc=desc, disable=not progress) as bar:
            for key, item in items:
                try:
                    result = _call(fn, shared, item, threads)
                except Exception as e:
                    raise EngineTaskError(key, e) from e
                bar.update()
                bar.set_postfix_str(key)
                yield key, result

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _total(items: Iterable, total: int | None) -> int | None:
    return total if total is not None else (len(items) if hasattr(items, "__len__") else None)


def _call(fn: Callable[[Any, Any], Any], shared: Any, item: Any, threads: int) -> Any:
    """An item's body on either engine (Ray resolves the shared reference before calling): fixed threads."""
    with fixed_threads(threads):
        return fn(shared, item)


class RayEngine:
    """One Ray task per item, with a per-task CPU/GPU share; Ray schedules, places and retries them."""

    name = "ray"

    def __init__(self, address: str | None = None, resources: TaskResources | None = None,
                 num_cpus: int | None = None, init_kwargs: dict | None = None):
        try:
            import ray
        except ImportError as e:  # the extra is optional: say how to get it
            raise RuntimeError("the ray engine needs Ray: pip install 'sglora[ray]'") from e
        self._ray = ray
        self.resources = resources or TaskResources()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING} | (init_kwargs or {})
            if address is None:
                kwargs["num_cpus"] = num_cpus  # a local Ray of this size; None: all of this machine's cores
            ray.init(address=address, **kwargs)
        self._remote = ray.remote(_call).options(
            num_cpus=self.resources.num_cpus, num_gpus=self.resources.num_gpus,
            max_retries=self.resources.max_retries, retry_exceptions=False,
        )

    def max_in_flight(self) -> int:
        """Twice the tasks the cluster can run at once with this share: workers never wait for the driver."""
        cluster = self._ray.cluster_resources()
        slots = [cluster.get("CPU", 1.0) / self.resources.num_cpus] if self.resources.num_cpus > 0 else []
        if self.resources.num_gpus > 0:
            slots.append(cluster.get("GPU", 0.0) / self.resources.num_gpus)
        return max(2, 2 * int(min(slots, default=1.0)))

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[tuple[str, Any]], shared: Any = None,
            desc: str = "items", progress: bool = True, total: int | None = None,
            max_in_flight: int | None = None, threads: int = 1) -> Iterator[tuple[str, Any]]:
        ray = self._ray
        shared_ref = ray.put(shared)  # once: every task gets this reference
        source = iter(items)
        window = max_in_flight or self.max_in_flight()
        pending: dict = {}

        def submit(n: int) -> None:
            for key, item in islice(source, n):
                pending[self._remote.remote(fn, shared_ref, item, threads)] = key

        submit(window)
        try:
            with tqdm(total=_total(items, total), desc=f"{desc} (ray)", disable=not progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    ref = done[0]
                    key = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        raise EngineTaskError(key, e.cause if e.cause is not None else e) from e
                    except ray.exceptions.RayError as e:  # worker died more than max_retries times, node lost
                        raise EngineTaskError(key, e) from e
                    bar.update()
                    bar.set_postfix_str(key)
                    submit(1)
                    yield key, result
        finally:
            for ref in pending:  # an error or an abandoned generator: don't leave the cluster working for nobody
                ray.cancel(ref, force=False)

    def close(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_engine(name: str = "local", address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                max_retries: int = 3, cluster_cpus: int | None = None) -> LocalEngine | RayEngine:
    """`name`: local | ray. num_cpus/num_gpus: each task's share; cluster_cpus: size of a Ray started here."""
    resources = TaskResources(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)
    if name == "local":
        return LocalEngine(resources)
    if name == "ray":
        return RayEngine(address, resources, num_cpus=cluster_cpus)
    raise ValueError(f"unknown engine {name!r}: choose one of {ENGINES}")
