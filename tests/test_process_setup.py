"""The job's worker-process setup hook: Tune's session check loaded alone, Tune intact after."""

import os
import subprocess
import sys

SCRIPT = """
import sys
from tvlars_ray import process_setup
process_setup.load_tune_session_check()
assert process_setup.TUNE_SESSION_CHECK in sys.modules
assert "ray.tune" not in sys.modules and "torch" not in sys.modules, "the hook stays light"
from ray.tune.trainable.trainable_fn_utils import _in_tune_session
assert not _in_tune_session()
loaded = sys.modules[process_setup.TUNE_SESSION_CHECK]
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable import trainable_fn_utils
assert trainable_fn_utils is loaded and tune.report is loaded.report
print("ok")
"""


def test_the_hook_loads_only_the_check_and_tune_still_imports_whole():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_train_worker_never_imports_tune(tmp_path):
    """What the hook is for: Ray Train's own check in a worker, with the hook run first."""
    script = """
import sys
from tvlars_ray import process_setup
process_setup.load_tune_session_check()
from ray.train.v2._internal.util import requires_train_worker
try:
    requires_train_worker()(lambda: None)()
except RuntimeError:
    pass  # not in a Train worker here: the check ran, and said so
print("ray.tune" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_the_hook_names_the_workers_own_cluster(ray_session):
    """With two local Ray instances, Ray's state API (used by Train's placement-group cleaner)
    can only find a worker's cluster through RAY_ADDRESS, which the hook sets."""
    import ray

    @ray.remote(num_cpus=0)
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray.get(address.remote()) == ray.get_runtime_context().gcs_address
