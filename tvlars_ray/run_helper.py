"""One actor per run for the two small jobs Ray 2.60 starts a process for in every trial.

Each process Ray starts costs about a CPU-second before it does anything (a Python with Ray
imported, its modules, its core worker's threads): on a laptop's two cores, a noticeable part
of a short trial. Two of a trial's processes do light work that every trial of a run can share:

- Tune's report queue (``ray.util.queue.Queue``, a ``_QueueActor`` per Tune trial): Ray
  Train's controller puts each epoch's report there, the trial's Tune function takes it.
- Ray Train's ``PlacementGroupCleaner`` (a detached actor per trial): it removes the trial's
  placement group when the controller dies without doing so (a trial Tune stops early, a
  killed driver process), else later trials can wait for ever for its CPUs (ray issue 54305).

:class:`RunHelper` does both for every trial of the run, in one process: started by
:func:`tvlars_ray.cluster.connect`, named, owned by the run's driver, on the head node. It ends
with the driver, as the placement groups of the driver's job do. A trial that finds no helper
(a TorchTrainer started some other way) uses Ray's own per-trial actors.

Only the standard library and ``ray`` are imported: the helper's process imports this module.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray._private import state as _ray_state
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Empty

NAME = "tvlars-run-helper"
CHECK_S = 1.0  # how often controllers are looked up (Ray's cleaner: every second)


class RunHelper:
    """Report queues by key (each holds one report, as Tune's does) and the placement groups
    of live Train controllers, by controller actor id."""

    def __init__(self, check_s: float = CHECK_S) -> None:
        self._queues: dict[str, asyncio.Queue] = {}
        self._watched: dict[str, PlacementGroup] = {}
        self._check_s = check_s
        self._monitor: asyncio.Task | None = None

    def _queue(self, key: str) -> asyncio.Queue:
        queue = self._queues.get(key)
        if queue is None:  # not setdefault: it would build a queue on every poll
            queue = self._queues[key] = asyncio.Queue(maxsize=1)
        return queue

    async def put(self, key: str, item: Any) -> None:
        await self._queue(key).put(item)

    async def get(self, key: str, timeout: float | None) -> tuple[bool, Any]:
        """(True, item), or (False, None) when none came within ``timeout`` seconds."""
        try:
            return True, await asyncio.wait_for(self._queue(key).get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def empty(self, key: str) -> bool:
        return key not in self._queues or self._queues[key].empty()

    async def close(self, key: str) -> None:
        self._queues.pop(key, None)

    async def watch(self, controller_id: str, group: PlacementGroup) -> None:
        """Remove ``group`` if the controller dies before :meth:`forget` is called."""
        self._watched[controller_id] = group
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch_loop())

    async def forget(self, controller_id: str) -> None:
        """The controller removes its placement group itself (a graceful end)."""
        self._watched.pop(controller_id, None)

    async def watching(self) -> list[str]:
        return list(self._watched)

    async def _watch_loop(self) -> None:
        while self._watched:
            await asyncio.sleep(self._check_s)
            for controller_id in list(self._watched):
                if not await asyncio.to_thread(_alive, controller_id):
                    group = self._watched.pop(controller_id, None)
                    if group is not None:
                        await asyncio.to_thread(_remove, group)


def _alive(actor_id: str) -> bool:
    """From Ray's GCS, as Ray's cleaner asks its state API (an unknown actor counts alive:
    it may not be registered yet)."""
    try:
        info = _ray_state.actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - GCS briefly unreachable: look again next time
        return True
    return not info or info.get("State") != "DEAD"


def _remove(group: PlacementGroup) -> None:
    try:
        if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
    except Exception:  # noqa: BLE001 - removed meanwhile, or the cluster is going down
        pass


_HELD: list[Any] = []  # the driver's handle: Ray ends an actor once no handle is left


def start() -> None:
    """Start this run's helper (the calling process owns it), unless it is up already."""
    if _HELD and find() is not None:
        return  # replacing the owner's handle by a looked-up one would end the actor
    _HELD[:] = [ray.remote(RunHelper).options(
        name=NAME, get_if_exists=True, num_cpus=0, max_concurrency=1000,
        resources={HEAD_NODE_RESOURCE_NAME: 0.001}).remote()]


def find() -> Any | None:
    """This run's helper, or None when the run started none."""
    try:
        return ray.get_actor(NAME)
    except ValueError:
        return None


class ReportQueue:
    """One Tune trial's report queue in the run's helper: what Tune's session calls of its
    ``ray.util.queue.Queue`` (``put``, ``get`` raising ``Empty``, ``empty``)."""

    def __init__(self, helper: Any) -> None:
        self._helper = helper
        self._key = uuid.uuid4().hex

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        ray.get(self._helper.put.remote(self._key, item))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        found, item = ray.get(self._helper.get.remote(self._key, timeout if block else 0))
        if not found:
            raise Empty
        return item

    def empty(self) -> bool:
        return ray.get(self._helper.empty.remote(self._key))

    def close(self) -> None:
        self._helper.close.remote(self._key)
