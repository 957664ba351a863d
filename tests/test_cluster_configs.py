"""cluster/: the `ray up` files pass Ray's own checks, the KubeRay files carry what KubeRay and
Ray's KubeRay autoscaler need, and every documented command is one the tools accept.

Nothing here calls a cloud API or starts Ray: each check runs the Ray code that `ray up`,
`ray start` or the KubeRay autoscaler runs on the file, stopping before the first cloud call.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
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
GPU_SIZES = {1, 4, 8}  # the GPU node shapes the configs offer
DRIVER = "TUNE_DRIVER"
DRIVER_MIN = 100  # 10,000 trial drivers at 0.01 each: never the limit


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_pin() -> str:
    found = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml pins no Ray version"
    return found.group(1)


def pyproject_dependencies() -> set[str]:
    """The distribution names in pyproject.toml's [project] dependencies."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(),
                      re.S | re.M)
    assert block, "no dependencies list in pyproject.toml"
    names = set(re.findall(r'"([A-Za-z0-9_.-]+)', block.group(1)))
    assert "ray" in names and "torch" in names, names  # the parse found the real list
    return names


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


@pytest.mark.parametrize("name", RAY_UP)
def test_nodes_install_this_checkout_and_the_pinned_ray(name):
    import ray

    pin = ray_pin()
    assert ray.__version__ == pin, "the venv's Ray is not pyproject.toml's"
    config = bootstrap(load(RAY_UP[name]))  # merges setup_commands into head/worker lists
    assert config["file_mounts"].get("~/tvlars-ray") == ".", "the checkout is not mounted"
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = config[role]
        assert any(f'"ray[default,tune,train]=={pin}"' in c for c in commands), role
        assert any(re.search(r"pip install .*-e ~/tvlars-ray\b", c) for c in commands), role


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
    pin = ray_pin()
    start = kuberay_ray_start(group["rayStartParams"], head)
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("name") for c in containers)
    image = containers[0]["image"]
    assert f":{pin}" in image, f"{image} is not Ray {pin}"
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
    images = [g["template"]["spec"]["containers"][0]["image"]
              for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    pythons = {re.search(r"-(py3\d+)", i).group(1) for i in images}
    assert len(pythons) == 1, f"one Python for head and workers: {images}"


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
    from ray.runtime_env import RuntimeEnv

    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "tvlars_ray.run grid" in spec["entrypoint"]
    assert spec.get("shutdownAfterJobFinishes") is True
    check_cluster_spec(spec["rayClusterSpec"])
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        # The sweep sizes itself from the GPUs present when it starts.
        assert group["replicas"] >= 1 and group["minReplicas"] == group["replicas"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own checks (URI kinds, pip list, ...)
    assert "working_dir" in env, "search_spaces/ must come with the code"
    assert not (missing := pyproject_dependencies() - {"ray"} - set(env.get("pip", []))), \
        f"pyproject.toml dependencies missing from the job's pip list: {missing}"


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
TOOL = re.compile(r"python3? -m tvlars_ray\.run\b")
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
