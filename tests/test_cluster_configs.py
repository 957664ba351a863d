"""cluster/: the `ray up` files pass Ray's own checks, the KubeRay files carry what KubeRay and
Ray's KubeRay autoscaler need, the cloud and KubeRay nodes all run the one project image that
cluster/Dockerfile builds, and every documented command is one the tools accept.

Nothing here calls a cloud API or starts Ray: each check runs the Ray code that `ray up`,
`ray start` or the KubeRay autoscaler runs on the file, stopping before the first cloud call.
No Docker engine either: the Dockerfile is read as text, and its one shell snippet that
computes something (the dependency list) is run here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_UP = {
    "aws": CLUSTER / "aws-gpu.yaml",
    "gcp": CLUSTER / "gcp-gpu.yaml",
    "onprem": CLUSTER / "onprem.yaml",
}
CLOUD = ["aws", "gcp"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
BUILD = re.compile(r"docker build -f (\S+) -t (\S+) ([^\s`'\",;)]+)")
PUSH = re.compile(r"docker push ([^\s`'\",;)]+)")
# pip, uv or conda installing anything: what a node must not do at boot.
INSTALL = re.compile(r"\b(?:pip3?|uv pip|conda|mamba) install\b")
GPU_SIZES = {1, 4, 8}  # the GPU node shapes the configs offer
DRIVER = "TUNE_DRIVER"
DRIVER_MIN = 100  # 10,000 trial drivers at 0.01 each: never the limit


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_pin() -> str:
    found = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml pins no Ray version"
    return found.group(1)


def pyproject(key: str) -> str:
    """A one-line string setting of pyproject.toml's [project] (tomllib is Python 3.11+)."""
    found = re.search(rf'^{key} = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, f"no {key} in pyproject.toml"
    return found.group(1)


def pyproject_dependencies() -> list[str]:
    """pyproject.toml's [project] dependencies, as written."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(),
                      re.S | re.M)
    assert block, "no dependencies list in pyproject.toml"
    requirements = re.findall(r'"([^"]+)"', block.group(1))
    assert any(r.startswith("ray[") for r in requirements) and "torch" in requirements
    return requirements


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined, comments out."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (buf + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def project_image() -> str:
    """The image the Dockerfile's own build command tags: the one every config must run."""
    builds = BUILD.findall(DOCKERFILE.read_text())
    assert len(builds) == 1, f"want one documented build command in the Dockerfile: {builds}"
    (dockerfile_path, image, context), = builds
    assert (dockerfile_path, context) == ("cluster/Dockerfile", "."), builds
    return image


def bootstrap(raw: dict) -> dict:
    """What `ray up` does to a config before its first cloud call (_bootstrap_config): merge
    the provider's defaults.yaml, then Ray's schema and consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def ray_start(commands: list[str]) -> dict:
    """The options of the one `ray start` among shell commands, parsed by Ray's own CLI."""
    from ray.scripts.scripts import start

    found = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(start.make_context("ray start", words[2:]).params)
    assert len(found) == 1, f"want one `ray start` in {commands}"
    return found[0]


def node_types(name: str) -> tuple[dict, dict[str, dict]]:
    config = bootstrap(load(RAY_UP[name]))
    types = config["available_node_types"]
    head = config["head_node_type"]
    return types[head], {k: v for k, v in types.items() if k != head}


# -- ray up files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_file_passes_rays_validation(name):
    bootstrap(load(RAY_UP[name]))


def test_validation_rejects_broken_files():
    """The check above has teeth: Ray's schema refuses a misspelt field or a missing one."""
    import jsonschema

    raw = load(RAY_UP["aws"])
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["head"]["resource"] = typo["available_node_types"]["head"].pop(
        "resources")
    with pytest.raises(jsonschema.ValidationError):
        bootstrap(typo)
    stray = copy.deepcopy(raw)
    stray["worker_start_commands"] = stray.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        bootstrap(stray)
    bad_head = copy.deepcopy(raw)
    bad_head["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        bootstrap(bad_head)


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_head_holds_the_trial_drivers_and_no_cpu(name):
    head, _ = node_types(name)
    assert head["resources"].get(DRIVER, 0) >= DRIVER_MIN
    # CPU 0: DDP workers never land on the head; without GPU nodes a sweep fails fast.
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_gpu_workers_scale_from_zero(name):
    _, workers = node_types(name)
    assert workers, "no worker node types"
    for kind, spec in workers.items():
        res = spec["resources"]
        assert spec["min_workers"] == 0, kind
        assert spec["max_workers"] >= 1, kind
        assert res.get("GPU") in GPU_SIZES, f"{kind}: {res}"
        assert res.get("CPU", 0) >= res["GPU"], f"{kind}: a DDP worker needs a CPU per GPU"
        # Trial drivers stay on the head, which is never scaled away.
        assert DRIVER not in res, kind
    assert max(w["resources"]["GPU"] for w in workers.values()) >= 4, \
        "no node type fits a 4-GPU paper trial on one node"


def test_aws_workers_can_write_s3():
    _, workers = node_types("aws")
    for kind, spec in workers.items():
        arn = spec["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\w+:instance-profile/[\w+=,.@/-]+", arn), kind


def gcp_attached_gpus(machine: str) -> int | None:
    """GPUs that come with an A2 / G2 machine type (n1 takes them as guestAccelerators)."""
    a2 = re.fullmatch(r"a2-(?:high|mega|ultra)gpu-(\d+)g", machine)
    if a2:
        return int(a2.group(1))
    g2 = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
          "g2-standard-32": 1, "g2-standard-24": 2, "g2-standard-48": 4, "g2-standard-96": 8}
    return g2.get(machine)


def test_gcp_gpu_workers_are_gpu_vms_that_can_write_gcs():
    _, workers = node_types("gcp")
    for kind, spec in workers.items():
        node = spec["node_config"]
        accel = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
        gpus = accel or gcp_attached_gpus(node["machineType"])
        assert gpus == spec["resources"]["GPU"], f"{kind}: {node['machineType']} has {gpus}"
        scheduling = node.get("scheduling", [])
        scheduling = scheduling if isinstance(scheduling, list) else [scheduling]
        assert {"onHostMaintenance": "TERMINATE"} in scheduling, f"{kind}: GPU VMs cannot migrate"
        scopes = [s for acct in node.get("serviceAccounts", []) for s in acct.get("scopes", [])]
        assert any(s.endswith(("/cloud-platform", "/devstorage.read_write")) for s in scopes), \
            f"{kind}: no storage scope, the workers cannot write the gs:// store"


def test_onprem_installs_this_checkout_and_the_pinned_ray():
    """Machines you have may lack Docker: on-prem copies the checkout and installs it."""
    import ray

    pin = ray_pin()
    assert ray.__version__ == pin, "the venv's Ray is not pyproject.toml's"
    config = bootstrap(load(RAY_UP["onprem"]))  # merges setup_commands into head/worker lists
    assert config["file_mounts"].get("~/tvlars-ray") == ".", "the checkout is not mounted"
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = config[role]
        assert any(f'"ray[default,tune,train]=={pin}"' in c for c in commands), role
        assert any(re.search(r"pip install .*-e ~/tvlars-ray\b", c) for c in commands), role


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_nodes_run_the_project_image_with_gpus_on_the_workers(name):
    config = bootstrap(load(RAY_UP[name]))
    docker = config["docker"]
    assert docker["image"] == project_image()
    assert not {"head_image", "worker_image"} & set(docker), "one image for every node"
    assert docker.get("container_name")
    assert "--gpus all" in docker.get("worker_run_options", [])
    # The head has no GPU: docker cannot start a container with --gpus there.
    assert not any("--gpus" in o for o in docker.get("run_options", []) +
                   docker.get("head_run_options", []))
    assert "~/tvlars-ray" not in config["file_mounts"], "the image has the code"


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_nodes_install_nothing_at_boot(name):
    config = bootstrap(load(RAY_UP[name]))  # every node type's lists merged in
    lists = {key: config[key] for key in config if key.endswith("_commands")}
    for kind, spec in config["available_node_types"].items():
        lists |= {f"{kind}.{key}": spec[key] for key in spec if key.endswith("_commands")}
    assert "setup_commands" in lists and "head_start_ray_commands" in lists, lists.keys()
    for where, commands in lists.items():
        for command in commands:
            assert not INSTALL.search(command), f"{name}: {where} installs at boot: {command}"
            assert "tvlars-ray" not in command, f"{name}: {where} touches a checkout: {command}"


def test_validation_sees_the_docker_block():
    """Ray's schema checks the docker block too: a misspelt field there is refused."""
    import jsonschema

    raw = load(RAY_UP["aws"])
    raw["docker"]["worker_run_option"] = raw["docker"].pop("worker_run_options")
    with pytest.raises(jsonschema.ValidationError):
        bootstrap(raw)


# -- the image ------------------------------------------------------------------------------
def test_dockerfile_builds_on_rays_own_gpu_image_at_the_pin():
    froms = [args for word, args in dockerfile() if word == "FROM"]
    assert len(froms) == 1, froms
    found = re.fullmatch(r"rayproject/ray:(\S+?)-py3(\d+)-(gpu|cu\d+)", froms[0])
    assert found, f"{froms[0]} is not one of Ray's GPU images, pinned by tag"
    assert found.group(1) == ray_pin()
    oldest = re.search(r">=\s*3\.(\d+)", pyproject("requires-python"))
    assert int(found.group(2)) >= int(oldest.group(1)), "the image's Python is too old"


def test_dockerfile_installs_the_project_and_its_dependencies():
    steps = dockerfile()
    copied = {}
    for word, args in steps:
        if word == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            copied |= {src: dest for src in sources}
    for source in ("pyproject.toml", "tvlars_ray", "search_spaces"):
        assert source in copied, f"the image lacks {source}"
    runs = [args for word, args in steps if word == "RUN"]
    project = str(Path(copied["tvlars_ray"]).parent)
    installs = [r for r in runs if re.search(rf"pip install .*{re.escape(project)}\b", r)]
    assert installs, f"no RUN pip-installs the project copied to {project}"
    assert not any(re.search(r"\s(-e|--editable)\s", r) for r in installs), \
        "installed editable: the spaces would stay outside the package"
    # The dependency layer: its list, computed by the Dockerfile's own snippet (tomllib: the
    # image's Python is 3.11), is pyproject's.
    pytest.importorskip("tomllib")
    (snippet,) = [r for r in runs if "tomllib" in r]
    words = shlex.split(snippet)
    code = words[words.index("-c") + 1].replace(copied["pyproject.toml"].rstrip("/") +
                                                "/pyproject.toml", "pyproject.toml")
    listed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == pyproject_dependencies()
    assert "-r" in words, "the listed dependencies are not installed"


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_no_venv():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def excluded(path: str) -> bool:
        verdict = False  # the last matching pattern decides, for the path or a folder above it
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            negated = pattern.startswith("!")
            if any(fnmatch(p, pattern.lstrip("!")) for p in prefixes):
                verdict = not negated
        return verdict

    for word, args in dockerfile():
        if word == "COPY":
            for source in [a for a in shlex.split(args) if not a.startswith("--")][:-1]:
                assert (ROOT / source).exists(), source
                assert not excluded(source), f"{source} is copied but ignored"
    for heavy in (".venv", "results", ".git", "tvlars_ray/__pycache__"):
        assert excluded(heavy), f"{heavy} would go into the build context"


def test_every_config_and_manifest_runs_the_same_image():
    image = project_image()
    # A valid reference with a tag, the tag being the package's version.
    assert re.fullmatch(r"[a-z0-9.-]+(?::\d+)?(?:/[a-z0-9._-]+)+:[\w.-]+", image), image
    assert image.rsplit(":", 1)[1] == pyproject("version")
    images = {str(RAY_UP[n].name): load(RAY_UP[n])["docker"]["image"] for n in CLOUD}
    for path in (RAYCLUSTER, RAYJOB):
        doc = load(path)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                images[f"{path.name}:{container['name']}"] = container["image"]
    assert set(images.values()) == {image}, images


def test_documented_image_builds_are_the_dockerfiles():
    """Each `docker build` / `docker push` shown in the docs builds and pushes the one image
    (or says IMAGE for yours), from the project root."""
    image = project_image()
    texts = {p: p.read_text() for p in [*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.md"),
                                        DOCKERFILE, ROOT / "README.md"]}
    builds = pushes = 0
    for path, text in texts.items():
        for _, line in logical_lines(text):
            for dockerfile_path, tag, context in BUILD.findall(line):
                builds += 1
                assert (dockerfile_path, context) == ("cluster/Dockerfile", "."), f"{path}: {line}"
                assert tag in (image, "IMAGE"), f"{path}: {line}"
            for tag in PUSH.findall(line):
                pushes += 1
                assert tag in (image, "IMAGE"), f"{path}: {line}"
    assert builds >= 4 and pushes >= 4, (builds, pushes)


def test_documented_helper_path_is_where_the_image_puts_it():
    (dest,) = [shlex.split(args)[-1] for word, args in dockerfile()
               if word == "COPY" and "request_gpus.py" in args]
    for path in [RAY_UP["aws"], RAY_UP["gcp"], RAYCLUSTER]:
        for called in re.findall(r"python3? (\S*request_gpus\.py)", path.read_text()):
            assert called.replace("~", "/home/ray") == dest, f"{path.name}: {called}"


@pytest.mark.parametrize("name", RAY_UP)
def test_head_serves_dashboard_and_metrics(name):
    config = bootstrap(load(RAY_UP[name]))
    head = ray_start(config["head_start_ray_commands"])
    assert head["head"]
    assert head["dashboard_host"] == "0.0.0.0"
    assert head["dashboard_port"] == 8265
    assert head["metrics_export_port"] == 8080
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker = ray_start(config["worker_start_ray_commands"])
    assert worker["address"] == "$RAY_HEAD_IP:6379"
    assert worker["metrics_export_port"] == 8080


def test_onprem_is_the_local_provider_without_node_types():
    import click

    raw = load(RAY_UP["onprem"])
    assert raw["provider"]["type"] == "local"
    assert "available_node_types" not in raw and "head_node_type" not in raw
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    # ... because Ray refuses them there:
    typed = copy.deepcopy(raw)
    typed["available_node_types"] = {"head": {"resources": {}, "node_config": {}}}
    with pytest.raises(click.ClickException):
        bootstrap(typed)
    # So the head's start line declares the drivers' resource (Ray parses it as JSON).
    head = ray_start(raw["head_start_ray_commands"])
    assert json.loads(head["resources"]).get(DRIVER, 0) >= DRIVER_MIN
    worker = ray_start(raw["worker_start_ray_commands"])
    assert DRIVER not in (worker["resources"] or "")


# -- KubeRay --------------------------------------------------------------------------------
def kuberay_ray_start(params: dict, head: bool) -> dict:
    """The `ray start` KubeRay builds from rayStartParams (`--key=value`, through a shell),
    parsed by Ray's own CLI."""
    assert all(isinstance(v, str) for v in params.values()), \
        f"rayStartParams values must be strings: {params}"
    words = ["--head"] if head else ["--address=head-svc:6379"]
    for key, value in params.items():
        words += shlex.split(f"--{key}={value}")
    from ray.scripts.scripts import start

    return start.make_context("ray start", words).params


def check_group(group: dict, head: bool) -> dict:
    start = kuberay_ray_start(group["rayStartParams"], head)
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("name") for c in containers)
    assert containers[0]["image"] == project_image()
    if not head:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            assert key in group, key
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        limits = containers[0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) in GPU_SIZES, limits
    return start


def check_cluster_spec(spec: dict) -> None:
    pin = ray_pin()
    assert spec.get("rayVersion") == pin
    head = check_group(spec["headGroupSpec"], head=True)
    assert json.loads(head["resources"]).get(DRIVER, 0) >= DRIVER_MIN
    assert head["num_cpus"] == 0, "the head would take DDP workers"
    assert head["dashboard_host"] == "0.0.0.0"
    assert head["metrics_export_port"] == 8080
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        check_group(group, head=False)


def autoscaler_view(spec: dict, name: str) -> dict:
    """The node types Ray's KubeRay autoscaler derives from the spec (it validates them too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def test_raycluster_has_what_kuberay_needs():
    cr = load(RAYCLUSTER)
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    assert cr["metadata"]["name"]
    spec = cr["spec"]
    assert spec.get("enableInTreeAutoscaling") is True
    check_cluster_spec(spec)
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0, "GPU pods should scale from zero"


def test_rayjob_has_what_kuberay_needs():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert TOOL.search(spec["entrypoint"]) and " grid " in spec["entrypoint"]
    assert spec.get("shutdownAfterJobFinishes") is True
    check_cluster_spec(spec["rayClusterSpec"])
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        # The sweep sizes itself from the GPUs present when it starts.
        assert group["replicas"] >= 1 and group["minReplicas"] == group["replicas"]
    # The image has the package and its spaces: the job installs and downloads nothing.
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert not {"pip", "uv", "conda", "working_dir", "py_modules"} & set(env), env


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_autoscaler_reads_drivers_and_gpus(path):
    doc = load(path)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    types = autoscaler_view(spec, doc["metadata"]["name"])
    head = types.pop("headgroup")
    assert head["resources"].get(DRIVER, 0) >= DRIVER_MIN
    assert head["resources"].get("CPU") == 0
    assert types and all(t["resources"].get("GPU", 0) in GPU_SIZES for t in types.values())


def test_kuberay_autoscaler_rejects_unquoted_resources():
    """KubeRay's quoting is needed: a plain JSON string is not read as custom resources."""
    spec = copy.deepcopy(load(RAYCLUSTER)["spec"])
    spec["headGroupSpec"]["rayStartParams"]["resources"] = json.dumps({DRIVER: 100})
    with pytest.raises(Exception):  # noqa: B017 - Ray raises whatever json.loads raises
        autoscaler_view(spec, "broken")


# -- documented commands --------------------------------------------------------------------
# The tool, as `python -m tvlars_ray.run` or as its console command `tvlars`.
TOOL = re.compile(r"python3? -m tvlars_ray\.run\b|(?<![\w/.-])tvlars"
                  r"(?= (?:grid|optuna|trial|status|report|export)\b)")
HELPER = re.compile(r"python3? \S*request_gpus\.py\b")
CUT = re.compile(r"[\"'`;|)]|&&|\s#")  # where a shell command embedded in text ends


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined (a continued line may be a # comment)."""
    out, buf, start = [], "", 0
    for no, line in enumerate(text.splitlines(), 1):
        piece = line.rstrip()
        if buf:
            piece = re.sub(r"^\s*#?\s*", "", piece)
        else:
            start = no
        if piece.endswith("\\"):
            buf += piece[:-1] + " "
            continue
        out.append((start, buf + piece))
        buf = ""
    return out


def commands(pattern: re.Pattern) -> list[tuple[str, str, list[str]]]:
    """(where, what precedes it in its shell command, argv) of each use in cluster/."""
    found = []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".md", ".py")):
        for no, line in logical_lines(path.read_text()):
            for match in pattern.finditer(line):
                rest = line[match.end():]
                rest = rest[:m.start()] if (m := CUT.search(rest)) else rest
                before = re.split(r"[\"'`;|]|&&", line[:match.start()])[-1]
                where = f"{path.relative_to(CLUSTER)}:{no}"
                found.append((where, before, shlex.split(rest)))
    return found


TOOL_COMMANDS = commands(TOOL)
HELPER_COMMANDS = commands(HELPER)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_documents_a_grid_run(path):
    name = str(path.relative_to(CLUSTER))
    runs = [argv for where, _, argv in TOOL_COMMANDS if where.startswith(name + ":")]
    assert any(argv[:1] == ["grid"] for argv in runs), f"{name} shows no grid command"


@pytest.mark.parametrize("where, before, argv", TOOL_COMMANDS,
                         ids=[w for w, _, _ in TOOL_COMMANDS])
def test_documented_tool_command_is_real(where, before, argv):
    from tvlars_ray.config import FIELD_NAMES, TrialConfig
    from tvlars_ray.run import build_parser
    from tvlars_ray.spaces import SPACES_DIR, load_space, parse_overrides, resolve

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the tool refuses {' '.join(argv)}")
    # On a cluster the results must land where every node (and you, later) can read them.
    assert "--store" in argv, f"{where}: no --store, the default ./results is per-node"
    if not args.store.startswith(("s3://", "gs://")):
        # A shared mount: the same absolute path on every node, and the tool told so.
        assert Path(args.store).is_absolute(), f"{where}: {args.store} differs per node"
        assert "TVLARS_SHARED_FS=1" in before, f"{where}: {args.store} without TVLARS_SHARED_FS=1"
    if args.command in ("grid", "optuna", "trial"):
        # Without it the tool starts a Ray of its own on the head instead of joining.
        assert args.address == "auto", f"{where}: joins no cluster (--address auto)"
    if args.command in ("grid", "optuna"):
        assert args.space, f"{where}: name the space"
        assert resolve(args.space).parent == SPACES_DIR, f"{where}: {args.space} is not shipped"
        space = load_space(args.space)
        if args.overrides:
            space = space.with_overrides(parse_overrides(args.overrides))
        assert space.is_optuna == (args.command == "optuna"), f"{where}: wrong kind of space"
        if not space.is_optuna:
            assert space.trials()
    if args.command == "trial":
        TrialConfig.from_dict({k: getattr(args, k) for k in FIELD_NAMES
                               if getattr(args, k, None) is not None})


def request_gpus_module():
    spec = importlib.util.spec_from_file_location("request_gpus", CLUSTER / "request_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_request_gpus_asks_for_whole_nodes():
    helper = request_gpus_module()
    assert helper.bundles(8, 4) == [{"GPU": 4}, {"GPU": 4}]
    assert helper.bundles(0, 4) == []
    with pytest.raises(ValueError):
        helper.bundles(6, 4)


@pytest.mark.parametrize("where, before, argv", HELPER_COMMANDS,
                         ids=[w for w, _, _ in HELPER_COMMANDS])
def test_documented_request_gpus_command_is_real(where, before, argv):
    helper = request_gpus_module()
    try:
        args = helper.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: request_gpus.py refuses {' '.join(argv)}")
    helper.bundles(args.gpus, args.per_node)
