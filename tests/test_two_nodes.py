"""A grid against two Ray nodes started as separate processes on this machine."""

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from tvlars_ray.run import main
from tvlars_ray.store import read_epochs, read_trials

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


def test_grid_runs_on_both_nodes_and_exports_metrics(tmp_path):
    import ray

    env = {**os.environ, "RAY": str(Path(sys.executable).with_name("ray")),
           "TEMP_DIR": f"/tmp/tvr2n-{os.getpid()}", "RAY_metrics_report_interval_ms": "1000"}
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-2000:]
    address = started.stdout.strip().splitlines()[-1]
    try:
        ray.init(address=address)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        head = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "TUNE_DRIVER" in n[
            "Resources"]}
        assert len(nodes) == 2 and len(head) == 1
        space = tmp_path / "two.yaml"
        space.write_text(yaml.safe_dump({
            "fixed": {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 600,
                      "test_subset": 200, "epochs": 3, "bs": 32, "num_workers": 2},
            "grid": {"opt": {"sgd": {"lr": 0.05}, "lars": {"lr": 4.0}}}}))
        store = str(tmp_path / "store")
        # Prometheus sees the live gauges while the grid runs: scrape as it goes
        outcome, seen = {}, []
        runner = threading.Thread(target=lambda: outcome.setdefault("rc", main([
            "grid", "--space", str(space), "--store", store, "--address", address, "--quiet",
            "--no-report"])))
        runner.start()
        while runner.is_alive():
            seen += [line for line in _metrics().splitlines() if line.startswith("ray_tvlars")]
            time.sleep(0.5)
        assert outcome["rc"] == 0
        trials = read_trials(store, "two")
        assert set(trials["status"]) == {"completed"}
        assert set(trials["node_id"]) == head  # trial drivers hold TUNE_DRIVER: the head
        epochs = read_epochs(store, "two")
        # the two trials ran at once, one worker group per node
        assert set(epochs["node_id"]) == nodes
        for trial_id in trials["trial_id"]:
            assert any(line.startswith("ray_tvlars_test_acc") and f'trial_id="{trial_id}"' in line
                       for line in seen), trial_id
        assert any(line.startswith("ray_tvlars_samples_per_s") for line in seen)
        assert any(line.startswith("ray_tvlars_trials") and 'status="running"' in line
                   for line in seen)
    finally:
        ray.shutdown()
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True)
