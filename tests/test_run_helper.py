"""The run's one helper actor: Tune's report queues and the placement-group cleaner."""

import threading
import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.queue import Empty

from tvlars_ray import run_helper


@pytest.fixture(scope="module")
def helper(ray_session):
    run_helper.start()  # connect() did; a second start finds the same actor
    found = run_helper.find()
    assert found is not None
    return found


def test_a_report_queue_holds_one_report_and_times_out_empty(helper):
    queue = run_helper.ReportQueue(helper)
    other = run_helper.ReportQueue(helper)
    assert queue.empty()
    started = time.monotonic()
    with pytest.raises(Empty):
        queue.get(timeout=0.3)
    assert time.monotonic() - started >= 0.25
    with pytest.raises(Empty):
        queue.get(block=False)
    queue.put({"epoch": 0})
    assert not queue.empty() and other.empty()  # each trial its own queue
    # a second report waits until the first is taken, as Tune's one-slot queue makes it
    second = threading.Thread(target=queue.put, args=({"epoch": 1},))
    second.start()
    time.sleep(0.5)
    assert second.is_alive()
    assert queue.get(timeout=5) == {"epoch": 0}
    second.join(timeout=10)
    assert not second.is_alive() and queue.get(timeout=5) == {"epoch": 1}
    queue.close()
    other.close()


@ray.remote(num_cpus=0)
class Controller:
    """Stands in for a Train controller: it creates a placement group, as one does."""

    def start(self) -> tuple[str, object]:
        group = placement_group([{"CPU": 0.01}])
        ray.get(group.ready())
        return ray.get_runtime_context().get_actor_id(), group


def _state(group) -> str:
    return placement_group_table(group).get("state")


def test_a_dead_controllers_placement_group_is_removed_a_finished_ones_kept(helper):
    dying, finished = Controller.remote(), Controller.remote()
    (dying_id, dying_group), (finished_id, finished_group) = ray.get(
        [dying.start.remote(), finished.start.remote()])
    ray.get([helper.watch.remote(dying_id, dying_group),
             helper.watch.remote(finished_id, finished_group)])
    ray.get(helper.forget.remote(finished_id))  # ended gracefully: it removes its own
    ray.kill(dying)
    ray.kill(finished)
    deadline = time.monotonic() + 20
    while _state(dying_group) != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _state(dying_group) == "REMOVED"
    assert _state(finished_group) == "CREATED"
    assert ray.get(helper.watching.remote()) == []
    ray.util.remove_placement_group(finished_group)
