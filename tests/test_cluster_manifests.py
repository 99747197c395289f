"""docker/ and cluster/ agree with the installed Ray, with each other and with the repository.

Nothing here starts a cluster: the launcher config is checked with Ray's own schema and
validation, the KubeRay manifests structurally, and every cross-reference (image, Ray
version, token, config path, working directory) is resolved.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay-raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"

RAY_BASE_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<platform>gpu|cu\d+)$")
PROJECT_IMAGE = re.compile(r"^(?P<repo>[a-z0-9.\-/]+/metarec):(?P<project>[^:]+)-ray(?P<ray>\d+\.\d+\.\d+)$")


def _single_document(path: Path) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every `NAME ...` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def _start_env(commands: list[str]) -> dict[str, str]:
    """Environment assignments in front of `ray start` in a launcher start command list."""
    starts = [segment for cmd in commands for segment in cmd.split(";") if "ray start" in segment]
    assert len(starts) == 1, f"expected one `ray start` command, found {starts}"
    words = shlex.split(starts[0])
    env = {}
    for word in words[: words.index("ray")]:
        key, _, value = word.partition("=")
        env[key] = value
    return env


def _ray_containers(cluster_spec: dict) -> dict[str, list[dict]]:
    """Containers of a RayClusterSpec by group ('head' or the worker groupName)."""
    groups = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in cluster_spec["workerGroupSpecs"]:
        groups[group["groupName"]] = group["template"]["spec"]["containers"]
    return groups


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _single_document(RAYCLUSTER)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _single_document(RAYJOB)


@pytest.fixture(scope="module")
def cluster_specs(raycluster, rayjob) -> dict[str, dict]:
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


# --- image ----------------------------------------------------------------------------

def test_dockerfile_builds_on_the_installed_ray_version():
    bases = _dockerfile_instructions("FROM")
    assert len(bases) == 1, f"one build stage expected, FROM lines: {bases}"
    match = RAY_BASE_IMAGE.match(bases[0])
    assert match, f"FROM {bases[0]!r} is not a rayproject/ray:<version>-py<xy>-<gpu|cuXYZ> tag"
    assert match["ray"] == ray.__version__
    assert _dockerfile_instructions("USER") == ["ray"]
    assert _dockerfile_instructions("WORKDIR") == ["/home/ray/metarec"]


def test_every_node_runs_the_same_project_image(launcher, cluster_specs):
    image = launcher["docker"]["image"]
    match = PROJECT_IMAGE.match(image)
    assert match, f"launcher image {image!r} is not <registry>/metarec:<version>-ray<version>"
    assert match["project"] == version("metarec")
    assert match["ray"] == ray.__version__
    for key in ("head_image", "worker_image"):
        assert launcher["docker"].get(key, image) == image
    for kind, spec in cluster_specs.items():
        for group, containers in _ray_containers(spec).items():
            assert [c["image"] for c in containers] == [image], f"{kind} {group}"
    assert image in (REPO / "docker" / "README.md").read_text(), "docker/README.md builds another tag"


def test_dockerignore_keeps_environments_outputs_and_data_out():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for pattern in (".venv/", ".git/", "runs/", ".cache/", "**/__pycache__/", "benchmarks/results/", "shared/"):
        assert pattern in patterns, pattern
    assert "README.md" not in patterns and "pyproject.toml" not in patterns  # pip install . needs both


# --- Ray cluster launcher ------------------------------------------------------------

def test_launcher_config_matches_the_schema_shipped_with_ray(launcher):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(launcher)


def test_launcher_config_passes_ray_up_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))  # what `ray up` runs before touching AWS


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(launcher):
    assert (launcher["provider"]["type"], launcher["provider"]["region"]) == ("aws", "us-west-2")
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert [t["node_config"]["InstanceType"] for t in workers.values()] == ["g5.xlarge"]
    assert [(t["min_workers"], t["max_workers"]) for t in workers.values()] == [(0, 8)]
    assert launcher["max_workers"] == 8
    # GPUs are passed to the worker containers only: the head has none.
    assert "--gpus all" in launcher["docker"]["worker_run_options"]
    assert "--gpus all" not in launcher["docker"].get("run_options", []) + launcher["docker"].get("head_run_options", [])


def test_dashboard_listens_on_the_head_loopback_only(launcher):
    commands = " ".join(launcher["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host[= ](\S+)", commands) == ["127.0.0.1"]


def test_token_auth_is_on_for_head_and_workers(launcher):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    mounts = launcher["file_mounts"]
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = _start_env(launcher[commands])
        assert env.get("RAY_AUTH_MODE") == "token", commands
        token_path = env.get("RAY_AUTH_TOKEN_PATH")
        assert token_path in mounts, f"{commands}: token file {token_path!r} is not a file mount"
        # ...copied from where `ray get-auth-token --generate` writes the local token.
        assert Path(os.path.expanduser(mounts[token_path])) == Path(os.path.expanduser(str(_get_default_token_path())))


# --- KubeRay ---------------------------------------------------------------------------

def test_kuberay_manifests_are_ray_io_v1_for_the_installed_ray(raycluster, rayjob, cluster_specs):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    for kind, spec in cluster_specs.items():
        assert spec["rayVersion"] == ray.__version__, kind
        assert spec["enableInTreeAutoscaling"] is True, kind


def test_kuberay_workers_get_one_gpu_and_the_head_none(cluster_specs):
    for kind, spec in cluster_specs.items():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head), kind
        assert spec["workerGroupSpecs"], kind
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1, (kind, group["groupName"])
            assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (kind, group["groupName"])


def test_kuberay_token_auth_and_credentials_come_from_secrets(cluster_specs):
    secret_names = set()
    for kind, spec in cluster_specs.items():
        auth = spec["authOptions"]
        assert auth["mode"] == "token", kind
        secret_names.add(auth["secretName"])
        for group, containers in _ray_containers(spec).items():
            for container in containers:
                env = {e["name"]: e for e in container.get("env", [])}
                # nothing may switch auth off or inline a credential
                assert "RAY_AUTH_MODE" not in env, (kind, group)
                assert not [n for n, e in env.items() if "value" in e and re.search("SECRET|TOKEN|KEY", n)], (kind, group)
                refs = [src["secretRef"]["name"] for src in container.get("envFrom", []) if "secretRef" in src]
                assert refs == ["metarec-s3"], (kind, group)
    assert len(secret_names) == 1, f"both manifests must share one token Secret: {secret_names}"


def test_rayjob_entrypoint_is_a_valid_cluster_training_run(rayjob, cluster_specs):
    from metarec.cli import train
    from metarec.config import load_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["metarec", "train"], argv
    params = train.make_context("train", argv[2:]).params  # unknown options fail here

    # The job runs in working_dir = the project directory of the image = the repo root.
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert [runtime_env["working_dir"]] == _dockerfile_instructions("WORKDIR")
    config_path = REPO / params["config_path"]
    assert config_path.is_file(), f"RayJob entrypoint names {params['config_path']}, missing from the repository"

    cfg = load_config(config_path, params["overrides"])
    assert params["ray_address"] == "auto"
    assert cfg.data.root.startswith("s3://") and params["out_dir"].startswith("s3://")
    assert cfg.ray.gpus_per_worker > 0, "actors without GPUs would never scale up the GPU workers"
    assert cfg.ray.num_workers == cfg.meta.tasks_per_iter
    (workers,) = cluster_specs["RayJob"]["workerGroupSpecs"]
    gpus = workers["maxReplicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.ray.num_workers * cfg.ray.gpus_per_worker <= gpus, "the worker group cannot host the actors"
