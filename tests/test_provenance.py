"""Provenance: the commit and the state of the checkout, versions, hosts, the command line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tvlars_ray import provenance
from tvlars_ray.provenance import (
    PACKAGES,
    collect,
    describe_places,
    git_state,
    trial_columns,
    worker_place,
)

ROOT = Path(__file__).resolve().parent.parent


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _repo(tmp_path: Path) -> tuple[Path, Path]:
    """A git checkout holding a package folder, committed."""
    repo = tmp_path / "repo"
    package = repo / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    return repo, package


def test_a_clean_checkout_records_its_commit(tmp_path):
    repo, package = _repo(tmp_path)
    state = git_state(package)
    assert state["commit"] == _git(repo, "rev-parse", "HEAD") and len(state["commit"]) == 40
    assert state["dirty"] is False and state["diff_sha256"] is None


def test_changes_make_it_dirty_and_the_hash_follows_them(tmp_path):
    repo, package = _repo(tmp_path)
    (package / "__init__.py").write_text("x = 2\n")
    first = git_state(package)
    assert first["dirty"] is True and len(first["diff_sha256"]) == 64
    (package / "__init__.py").write_text("x = 3\n")
    second = git_state(package)
    assert second["diff_sha256"] != first["diff_sha256"]
    (package / "__init__.py").write_text("x = 2\n")
    assert git_state(package)["diff_sha256"] == first["diff_sha256"]  # same change, same hash
    # an untracked file counts too
    (package / "__init__.py").write_text("x = 1\n")
    assert git_state(package)["dirty"] is False
    (repo / "new.py").write_text("y = 1\n")
    untracked = git_state(package)
    assert untracked["dirty"] is True and untracked["diff_sha256"]


def test_code_outside_a_git_checkout_says_so(tmp_path):
    package = tmp_path / "site-packages" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    state = git_state(package)
    assert state["commit"] is None and "not a git checkout" in state["reason"]
    # a wheel installed into a virtual environment inside some checkout is not that code
    repo, _ = _repo(tmp_path)
    inside = repo / ".venv" / "lib" / "pkg"
    inside.mkdir(parents=True)
    (inside / "__init__.py").write_text("")
    assert git_state(inside)["commit"] is None


def test_an_installed_copy_records_its_version_instead_of_failing(tmp_path):
    """The package copied outside any checkout, as a wheel installs it: collect() works."""
    shutil.copytree(ROOT / "tvlars_ray", tmp_path / "tvlars_ray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json; from tvlars_ray.provenance import collect; "
            "print(json.dumps(collect(['grid'])))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert record["git"]["commit"] is None and "not a git checkout" in record["git"]["reason"]
    assert record["versions"]["torch"] and record["command"].endswith("tvlars_ray.run grid")


def test_collect_records_versions_host_command_and_cuda():
    record = collect(["grid", "--space", "quick start"])
    assert record["command"] == "python -m tvlars_ray.run grid --space 'quick start'"
    assert set(record["versions"]) == {"python", *PACKAGES}
    assert torch.__version__.startswith(record["versions"]["torch"])
    assert record["host"] and record["cuda_version"] == torch.version.cuda
    assert record["gpus"] == ([torch.cuda.get_device_name(i)
                               for i in range(torch.cuda.device_count())]
                              if torch.cuda.is_available() else [])
    # this checkout: the commit it is at
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert record["git"]["commit"] == head
    columns = trial_columns(record)
    assert columns["git_commit"] == head and json.loads(columns["versions"])["ray"]
    assert columns["command_host"] == record["host"]


def test_places_of_the_workers():
    here = worker_place(torch.device("cpu"))
    assert here["host"] and here["gpu"] is None
    gpus = [{"host": "b", "gpu": "NVIDIA H200", "cuda_version": "13.0", "cudnn_version": "9"},
            {"host": "a", "gpu": "NVIDIA H200", "cuda_version": "13.0", "cudnn_version": "9"},
            {"host": "a", "gpu": "NVIDIA A10G", "cuda_version": "13.0", "cudnn_version": "9"}]
    assert describe_places(gpus) == {"hosts": "a,b", "gpus": "1 x NVIDIA A10G,2 x NVIDIA H200",
                                     "cuda_version": "13.0", "cudnn_version": "9"}
    assert describe_places([here])["gpus"] is None


def test_git_missing_is_recorded_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    state = provenance.git_state()
    assert state["commit"] is None and state["reason"] == "git is not installed"
