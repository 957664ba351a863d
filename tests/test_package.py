"""The installable package: the sdist and the wheel carry every shipped space and the `tvlars`
command, and every command runs from an installed wheel, outside this checkout.

The wheel is built once per module (from the sdist, as `python -m build` does) and installed
into a fresh virtual environment; the commands run from a folder outside the checkout and
without PYTHONPATH, so the source tree cannot shadow the wheel. Installing the dependencies
into that venv as well would take minutes and ~6 GB (torch), so here the wheel goes in with
--no-deps and the venv sees this environment's packages through a .pth file of plain paths
(a plain path line: the .pth files in that folder, such as this checkout's editable install,
are not run). `.ci/run` installs the wheel with its dependencies into a fresh venv.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tvlars_ray import spaces
from tvlars_ray.config import ConfigError
from tvlars_ray.spaces import load_space

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
# A tiny real trial: a small CNN on synthetic CIFAR-shaped images, one epoch, in-process.
TRIAL = ["trial", "--local", "--ds", "synthetic", "--model", "cnn", "--epochs", "1",
         "--bs", "32", "--train_subset", "128", "--test_subset", "64", "--opt", "tvlars",
         "--lr", "1", "--experiment", "probe"]


def run(argv: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def venv_with_this_environment(path: Path) -> Path:
    """A fresh venv whose own site-packages comes first, then this environment's packages."""
    run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               cwd=path.parent).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "_tvlars_test_deps.pth").write_text("\n".join(ours) + "\n")
    return python


def pip_install(python: Path, *what: str | Path) -> None:
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", *what], cwd=python.parent)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist from this checkout, the wheel built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "build_meta.build_sdist(sys.argv[1])", out], cwd=ROOT)
    (sdist,) = out.glob("*.tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", out, sdist], cwd=out)
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """The bin/ folder of a venv with the wheel installed."""
    python = venv_with_this_environment(tmp_path_factory.mktemp("wheel") / "venv")
    pip_install(python, built[1])
    return python.parent


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working folder outside the checkout."""
    return tmp_path_factory.mktemp("work")


def test_sdist_and_wheel_carry_every_space_module_and_the_command(built):
    sdist, wheel = built
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {f"search_spaces/{s}.yaml" for s in SHIPPED} <= in_sdist
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(whl.read(meta).decode())
    assert {f"tvlars_ray/search_spaces/{s}.yaml" for s in SHIPPED} <= names
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tvlars_ray").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, f"not in the wheel: {sorted(modules - names)}"
    assert not any(n.startswith(("tests/", "search_spaces/", "cluster/")) for n in names)
    assert entry_points["console_scripts"]["tvlars"] == "tvlars_ray.run:cli"


# Run by the wheel's venv: every shipped space with the command that fits it, and the store
# commands on the store the trial wrote; one process, since each start imports torch and Ray.
DRIVER = """
import contextlib, io, json, sys
import tvlars_ray
from tvlars_ray.run import main
from tvlars_ray.spaces import SPACES_DIR, load_space

store, report, export = sys.argv[1:4]
runs = {}
def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    runs[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
for name in sorted(p.stem for p in SPACES_DIR.glob("*.yaml")):
    call(["optuna" if load_space(name).is_optuna else "grid", "--dry-run", "--space", name])
call(["status", "--store", store])
call(["report", "--store", store, "--out", report])
call(["export", "--store", store, "--out", export])
print(json.dumps({"package": tvlars_ray.__file__, "spaces": str(SPACES_DIR), "runs": runs}))
"""


@pytest.fixture(scope="module")
def from_the_wheel(installed, outside) -> dict:
    """A real tiny trial by the console command, then the driver above, both from the wheel."""
    store = outside / "store"
    trial = run([installed / "tvlars", *TRIAL, "--store", store], cwd=outside).stdout
    driven = run([installed / "python", "-c", DRIVER, store, outside / "report",
                  outside / "export"], cwd=outside).stdout
    return {"trial": trial, **json.loads(driven.splitlines()[-1])}


def test_the_wheel_not_the_checkout_runs(from_the_wheel, installed):
    venv = installed.parent
    package = Path(from_the_wheel["package"])
    assert venv in package.parents and ROOT not in package.parents, package
    assert Path(from_the_wheel["spaces"]) == package.parent / "search_spaces"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_dry_runs_from_the_wheel(from_the_wheel, name):
    command = "optuna" if load_space(name).is_optuna else "grid"
    code, out, err = from_the_wheel["runs"][f"{command} --dry-run --space {name}"]
    assert code == 0, err
    head = f"optuna '{name}'" if command == "optuna" else f"space '{name}'"
    assert out.startswith(head), out
    if command == "grid":  # the whole grid, paper-nowarmup's 246 trials too
        assert f"\n{len(load_space(name).trials())} trials" in out, out


def test_trial_status_report_export_from_the_wheel(from_the_wheel, outside):
    # the trial ran by the console command `tvlars` (each process start imports torch and
    # Ray, so the paper grid's dry run goes through the driver above, from the same wheel)
    assert "completed" in from_the_wheel["trial"], from_the_wheel["trial"]
    runs = {argv.split()[0]: result for argv, result in from_the_wheel["runs"].items()}
    for command in ("status", "report", "export"):
        assert runs[command][0] == 0, f"{command}: {runs[command][2]}"
    assert re.search(r"experiment probe: 1 trials \(.*\b1 completed\b", runs["status"][1]), \
        runs["status"][1]
    assert (outside / "report" / "report.md").is_file()
    assert list((outside / "report").glob("*.png")), "the report drew no plots"
    assert "wrote 1 files" in runs["export"][1], runs["export"][1]
    assert list((outside / "export").rglob("*.parquet"))


def test_editable_install_finds_the_checkouts_spaces(tmp_path):
    python = venv_with_this_environment(tmp_path / "venv")
    pip_install(python, "--editable", ROOT)
    out = run([python.parent / "tvlars", "grid", "--dry-run", "--space", "quickstart"],
              cwd=tmp_path).stdout
    assert out.startswith("space 'quickstart'"), out


def test_an_install_without_spaces_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(spaces, "SPACES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="no shipped spaces in .*: reinstall tvlars-ray"):
        spaces.resolve("quickstart")
