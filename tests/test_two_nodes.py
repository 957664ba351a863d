"""A grid against two Ray nodes started as separate processes on this machine, which loses
the second node mid-trial."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tvlars_ray.run import main
from tvlars_ray.store import Store, read_epochs, read_trials

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "local-two-node.sh"
METRIC_PORTS = (28080, 28081)


def _metrics() -> str:
    text = ""
    for port in METRIC_PORTS:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                text += page.read().decode()
        except OSError:
            pass
    return text


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node as separate processes; the driver joined to them."""
    import ray

    env = {**os.environ, "RAY": str(Path(sys.executable).with_name("ray")),
           "TEMP_DIR": f"/tmp/tvr2n-{os.getpid()}", "RAY_metrics_report_interval_ms": "1000",
           # a lost node is declared dead within seconds, not half a minute
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    if ray.is_initialized():  # joined elsewhere by an earlier test
        ray.shutdown()
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-2000:]
    address = started.stdout.strip().splitlines()[-1]
    try:
        ray.init(address=address)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True)


def _space(tmp_path: Path, name: str, epochs: int, grid: dict) -> str:
    """Each trial one worker holding a whole node's 2 CPUs: two trials at once take one node
    each (where they run is the point here, not DDP across ranks: half the processes)."""
    space = tmp_path / f"{name}.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
                  "test_subset": 128, "epochs": epochs, "bs": 32, "num_workers": 1,
                  "cpus_per_worker": 2},
        "grid": grid}))
    return str(space)


def _grid_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("rc", main(argv)))
    runner.start()
    return runner, outcome


def _node_groups(node_id: str) -> set[int]:
    """The process groups of a node: its raylet's (which ``ray start`` leads) and those of
    the processes the raylet started. Ray puts each worker in a group of its own, so a kill
    of the raylet's group alone leaves the node's Train workers training (and storing epochs)
    for seconds, until they notice; a lost machine loses them all at once."""
    parents, raylet = {}, None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if cmdline[0].endswith(b"raylet") and f"--node_id={node_id}".encode() in cmdline:
                raylet = int(entry.name)
    assert raylet is not None, f"no raylet for node {node_id}"
    groups = {os.getpgid(raylet)}
    for pid, parent in parents.items():
        if parent == raylet:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
    return groups


def test_a_grid_on_both_nodes_exports_metrics_and_survives_losing_one(two_nodes, tmp_path):
    """Two trials at once, one worker group per node, their gauges scraped as they go; then
    SIGKILL the second node while a trial's workers run there: that trial continues from its
    checkpoint on the head (FailureConfig), the grid completes, each epoch stored once.
    One grid shows both, as the cluster's start-up costs as much as the grid."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    nodes = {n["NodeID"] for n in alive}
    heads = [n["NodeID"] for n in alive if "TUNE_DRIVER" in n["Resources"]]
    assert len(nodes) == 2 and len(heads) == 1
    head = heads[0]
    other = next(iter(nodes - {head}))
    space = _space(tmp_path, "two", 4, {"opt": {"sgd": {"lr": 0.05}, "lars": {"lr": 4.0}}})
    store = str(tmp_path / "store")
    st = Store(store)
    seen: list[str] = []  # Prometheus sees the live gauges while the grid runs
    runner, outcome = _grid_in_thread(["grid", "--space", space, "--store", store,
                                       "--address", two_nodes, "--quiet", "--no-report"])
    deadline = time.time() + 480
    victim = killed_at = None
    stored_on: set[str] = set()  # nodes that stored epochs, seen before a restart rewrites them
    while runner.is_alive() and time.time() < deadline:
        seen += [line for line in _metrics().splitlines() if line.startswith("ray_tvlars")]
        if victim is None and st.is_experiment("two"):
            epochs = st.read_epochs("two")
            stored_on |= set(epochs["node_id"])
            there = epochs[epochs["node_id"] == other]
            if len(there):
                victim = there["trial_id"].iloc[0]
                groups = _node_groups(other)
                assert not groups & ({os.getpgrp()} | _node_groups(head))  # only the second
                for group in groups:
                    os.killpg(group, signal.SIGKILL)
                killed_at = pd.Timestamp.now(tz="UTC")
        time.sleep(0.2)
    assert not runner.is_alive(), "the grid hung"
    assert victim is not None, "no trial ran on the second node"
    assert outcome["rc"] == 0
    trials = read_trials(store, "two")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert set(trials["node_id"]) == {head}  # trial drivers hold TUNE_DRIVER: the head
    epochs = read_epochs(store, "two")
    # the two trials ran at once, one worker group per node (the lost node's epochs may be
    # written again on the head, when the kill lands before their checkpoint)
    assert stored_on | set(epochs["node_id"]) == nodes
    assert len(epochs) == 8 and not epochs.duplicated(["trial_id", "stage", "epoch"]).any()
    moved = epochs[epochs["trial_id"] == victim]
    # it carried on on the surviving node, in a new attempt: nothing ran on the lost one
    assert (moved.loc[moved["recorded_at"] > killed_at, "node_id"] == head).all()
    assert (moved["worker_started_at"] > killed_at).any()
    for trial_id in trials["trial_id"]:
        assert any(line.startswith("ray_tvlars_test_acc") and f'trial_id="{trial_id}"' in line
                   for line in seen), trial_id
    assert any(line.startswith("ray_tvlars_samples_per_s") for line in seen)
    assert any(line.startswith("ray_tvlars_trials") and 'status="running"' in line
               for line in seen)
