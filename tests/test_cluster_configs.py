"""Cluster configs: every file parses, the launcher configs pass Ray's own schema validation,
the KubeRay manifests carry the fields KubeRay needs, and versions, capacities and job
commands agree across cluster/, jobs/ and pyproject.toml."""

import copy
import json
import re
import shlex
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = [CLUSTER / "aws-a100.yaml", CLUSTER / "gcp-a100.yaml"]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.I)


def load(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def locked() -> dict[str, str]:
    """``{name: version}`` of cluster/requirements.txt (extras dropped)."""
    out = {}
    for line in (CLUSTER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"\[.*\]", "", name).lower()] = version
    return out


def kuberay() -> tuple[dict, dict]:
    cluster = next(d for d in load(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster")
    (job,) = load(CLUSTER / "kuberay" / "rayjob.yaml")
    return cluster, job


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.json")),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_parses(path):
    docs = load(path) if path.suffix == ".yaml" else [json.loads(path.read_text())]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(path)[0]
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs first
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_a100"]["max_worker"] = 4  # a typo must not pass
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_gpu_workers_setup_and_storage(path):
    cfg = load(path)[0]
    gpu = cfg["available_node_types"]["gpu_a100"]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0
    ray_version = locked()["ray"]
    assert all(f"ray:{ray_version}-" in cfg["docker"][k] for k in ("image", "head_image"))
    assert any("cluster/requirements.txt" in c for c in cfg["setup_commands"])
    storage = [o for o in cfg["docker"]["run_options"] if "RAYREC_STORAGE_ROOT=" in o]
    assert len(storage) == 1, "the storage root is set in exactly one place"
    assert storage[0].split("=", 1)[1].startswith("/mnt/cluster_storage/")


def test_launcher_capacity_lets_gpu_jobs_wait_for_autoscaled_nodes(tmp_path):
    """On the head, the bootstrap config says what the cluster can grow to: 4 x p4d."""
    from rayrec.cluster import launcher_capacity

    cfg = load(CLUSTER / "aws-a100.yaml")[0]
    (tmp_path / "boot.yaml").write_text(yaml.safe_dump(cfg))
    assert launcher_capacity(tmp_path / "boot.yaml") == {"CPU": 384.0, "GPU": 32.0}
    assert launcher_capacity(tmp_path / "absent.yaml") == {}


def test_kuberay_manifests_carry_the_required_fields():
    cluster, job = kuberay()
    for doc in (cluster, job):
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == locked()["ray"] and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "rayStartParams" in spec["headGroupSpec"] and head["image"]
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and "rayStartParams" in group
    js = job["spec"]
    assert job["kind"] == "RayJob" and js["shutdownAfterJobFinishes"] is True and js["entrypoint"]
    env = yaml.safe_load(js["runtimeEnvYAML"])
    assert env["working_dir"] and env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert js["rayClusterSpec"] == spec, "rayjob.yaml's cluster must be raycluster.yaml's spec"


def test_kuberay_declared_capacity_matches_the_worker_group():
    cluster, _ = kuberay()
    spec = cluster["spec"]
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    declared = json.loads(env["RAYREC_MAX_RESOURCES"]["value"])
    n = group["maxReplicas"]
    assert declared == {"CPU": n * int(limits["cpu"]), "GPU": n * limits["nvidia.com/gpu"]}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_secrets_come_from_kubernetes_secrets():
    cluster, job = kuberay()
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for pod in pods:
        for env in pod["template"]["spec"]["containers"][0].get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert not [k for k in runtime_env["env_vars"] if SECRET_NAME.search(k)]


def test_rayjob_entrypoint_is_a_valid_rayrec_command():
    from rayrec.cli import build_parser
    from rayrec.config import load_job

    _, job = kuberay()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "rayrec"]
    args, extra = build_parser().parse_known_args(argv[3:])
    assert not extra and args.cmd == "train" and (ROOT / args.job).is_file()
    cfg = load_job(ROOT / args.job, args.overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers * cfg.scaling.resources_per_worker["GPU"] <= 32


def test_lock_pins_every_dependency_inside_its_range():
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in requires("rayrec") if "extra ==" not in d]  # pyproject, as installed
    pins = locked()
    missing = [d.name for d in deps if d.name.lower() not in pins]
    assert not missing, f"add {missing} to cluster/requirements.txt, pinned"
    outside = [f"{d.name}=={pins[d.name.lower()]} vs {d.specifier}" for d in deps
               if not d.specifier.contains(pins[d.name.lower()], prereleases=True)]
    assert not outside, f"cluster/requirements.txt pins outside pyproject's ranges: {outside}"


def test_images_use_the_locked_ray():
    import ray

    version = locked()["ray"]
    assert version == ray.__version__, "the cluster must run the Ray the tests ran with"
    assert f"FROM rayproject/ray:{version}-" in (CLUSTER / "Dockerfile").read_text()
    cluster, _ = kuberay()
    images = [g["template"]["spec"]["containers"][0]["image"]
              for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]]
    assert all(f":{version}-" in image for image in images)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_file_says_how_to_run_it_locally_and_on_a_cluster(path):
    """The header has a ``# local: rayrec ...`` line and ``# cluster: ...`` line(s) naming this
    file, and every one of those commands parses with rayrec's own CLI."""
    from rayrec.cli import build_parser

    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [(m.group(1), m.group(2)) for m in (re.match(r"#\s*(local|cluster):\s*(.+)", h) for h in header) if m]
    rel = f"jobs/{path.name}"
    assert {kind for kind, _ in commands} == {"local", "cluster"}, f"{rel} needs '# local:' and '# cluster:' lines"
    for kind, command in commands:
        argv = shlex.split(command)
        if argv[:3] == ["ray", "job", "submit"]:
            assert "--working-dir" in argv and "--" in argv, command
            argv = argv[argv.index("--") + 1:]
        assert argv[0] == "rayrec" and rel in argv, f"{kind} command of {rel}: {command}"
        args, extra = build_parser().parse_known_args(argv[1:])
        assert str(args.job) == rel and all("=" in x and not x.startswith("-") for x in extra), command
        if args.cmd == "submit":
            assert args.address and args.command.split()[0] in build_parser()._subparsers._group_actions[0].choices
