"""Which code, which packages and which machines produced a result.

A command records, once, what it ran from (the git commit of the checkout and whether it had
uncommitted changes, with a hash of them; the installed version when the code is not a git
checkout), the versions of the packages that decide the numbers, the CUDA / cuDNN build and
GPUs of its machine, its host name and its command line. Each DDP worker adds where it ran
(host, GPU model, CUDA and cuDNN). The store keeps both: ``provenance.json`` per experiment
and columns per trial and epoch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import shlex
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# The packages whose versions can change a trial's numbers or how it runs.
PACKAGES = ("tvlars-ray", "torch", "torchvision", "ray", "optuna", "pyarrow", "numpy")
PROVENANCE_FILE = "provenance.json"
# Untracked files bigger than this enter the diff hash by name and size only.
HASH_FILE_LIMIT = 16 * 2**20


def _git(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)


def git_state(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The commit the package's code comes from, whether the checkout differs from it and a
    SHA-256 of the difference (``git diff HEAD`` and the untracked files), or, where the code
    is not in a git checkout (an installed wheel), why there is no commit."""
    state: dict[str, Any] = {"commit": None, "dirty": None, "diff_sha256": None}
    try:
        # the package's own files must be tracked: a wheel installed into a virtual
        # environment inside some checkout is not that checkout's code
        tracked = _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir)
        if tracked.returncode != 0:
            return {**state, "reason": f"not a git checkout: {package_dir}"}
        root = Path(_git(["rev-parse", "--show-toplevel"], package_dir).stdout.decode().strip())
        head = _git(["rev-parse", "HEAD"], root)
        if head.returncode != 0:
            return {**state, "reason": f"no commit yet in {root}"}
        diff = _git(["diff", "HEAD", "--binary"], root).stdout
        untracked = _git(["ls-files", "--others", "--exclude-standard", "-z"], root).stdout
    except FileNotFoundError:
        return {**state, "reason": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {**state, "reason": "git did not answer within 30 s"}
    names = sorted(n for n in untracked.decode().split("\0") if n)
    digest = hashlib.sha256(diff)
    for name in names:
        path = root / name
        size = path.stat().st_size if path.is_file() else 0
        digest.update(f"\0{name}\0{size}\0".encode())
        if path.is_file() and size <= HASH_FILE_LIMIT:
            digest.update(path.read_bytes())
    dirty = bool(diff) or bool(names)
    return {"commit": head.stdout.decode().strip(), "dirty": dirty,
            "diff_sha256": digest.hexdigest() if dirty else None, "root": str(root)}


def versions() -> dict[str, str | None]:
    """Python's version and each package's installed version (None where it is missing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cuda_build() -> dict[str, str | None]:
    """The CUDA and cuDNN torch was built with (None for a CPU-only build)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"cuda_version": torch.version.cuda, "cudnn_version": str(cudnn) if cudnn else None}


def local_gpus() -> list[str]:
    """The models of this machine's visible GPUs."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def command_line(argv: Sequence[str], prog: str = "python -m tvlars_ray.run") -> str:
    return shlex.join([*shlex.split(prog), *argv])


def collect(argv: Sequence[str], prog: str = "python -m tvlars_ray.run") -> dict[str, Any]:
    """This command's provenance: what ``provenance.json`` records for one run of it
    (``prog``: how the command was called, ``tvlars`` or ``python -m tvlars_ray.run``)."""
    return {"command": command_line(argv, prog), "cwd": str(Path.cwd()),
            "host": socket.gethostname(),
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git": git_state(), "versions": versions(), **cuda_build(), "gpus": local_gpus()}


def trial_columns(record: dict[str, Any]) -> dict[str, Any]:
    """The command's provenance as the trials table holds it (``store.PROVENANCE_COLUMNS``)."""
    git = record["git"]
    return {"git_commit": git.get("commit"), "git_dirty": git.get("dirty"),
            "git_diff_sha256": git.get("diff_sha256"),
            "versions": json.dumps(record["versions"], sort_keys=True),
            "command": record["command"], "command_host": record["host"]}


def worker_place(device: torch.device) -> dict[str, str | None]:
    """Where this DDP worker runs: its host, and its GPU with CUDA and cuDNN when it uses one."""
    place: dict[str, str | None] = {"host": socket.gethostname(), "gpu": None,
                                    "cuda_version": None, "cudnn_version": None}
    if device.type == "cuda":
        place.update(gpu=torch.cuda.get_device_name(device), **cuda_build())
    return place


def describe_places(places: Sequence[dict[str, str | None]]) -> dict[str, str | None]:
    """Every worker's place as the epoch columns hold them: distinct hosts, the GPU models
    with their counts (``2 x NVIDIA H200``), the CUDA and cuDNN versions."""

    def joined(values: list[str | None]) -> str | None:
        kept = sorted({v for v in values if v})
        return ",".join(kept) if kept else None

    gpus = [p["gpu"] for p in places if p.get("gpu")]
    counts = {g: gpus.count(g) for g in sorted(set(gpus))}
    return {"hosts": joined([p.get("host") for p in places]),
            "gpus": ",".join(f"{n} x {g}" for g, n in counts.items()) or None,
            "cuda_version": joined([p.get("cuda_version") for p in places]),
            "cudnn_version": joined([p.get("cudnn_version") for p in places])}
