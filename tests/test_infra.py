"""The cluster artefacts under infra/: KubeRay manifests valid against KubeRay's own CRD schemas
(vendored in infra/kuberay/crds), using the image infra/Dockerfile builds and entrypoints, configs
and Ray version that exist in this repository."""

from __future__ import annotations

import copy
import gzip
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from pipeline import __version__
from pipeline.config import load_config

ROOT = Path(__file__).parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CRD_FOR_KIND = {"RayCluster": "ray.io_rayclusters", "RayJob": "ray.io_rayjobs", "RayCronJob": "ray.io_raycronjobs"}
# the operator's own checks that the CRD schema does not express (controllers/ray/utils/validation.go)
MAX_NAME = {"RayCluster": 63, "RayJob": 47, "RayCronJob": 36}


@cache
def strict_schema(kind: str) -> dict:
    """The CRD's v1 openAPIV3Schema with unknown keys forbidden: the API server silently prunes
    them, so a misspelt field (shutdownAfterJobFinish) would otherwise pass and do nothing."""
    with gzip.open(KUBERAY / "crds" / f"{CRD_FOR_KIND[kind]}.yaml.gz", "rt") as file:
        crd = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _forbid_unknown(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _forbid_unknown(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _forbid_unknown(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_unknown(value)
    return node


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(strict_schema(document["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]


def kubernetes_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def documents() -> list[tuple[str, dict]]:
    """The KubeRay resources: the manifests' own, and RayJob templates that a ConfigMap holds."""
    found = []
    for name, doc in kubernetes_documents():
        if doc["kind"] == "ConfigMap":
            found += [(f"{name}:{key}", inner) for key, text in doc["data"].items() if key.endswith(".yaml")
                      for inner in yaml.safe_load_all(text)]
        elif doc["apiVersion"].startswith("ray.io/"):
            found.append((name, doc))
    return found


def by_kind(kind: str) -> dict:
    return {doc["metadata"]["name"]: doc for _, doc in kubernetes_documents() if doc["kind"] == kind}


def dockerfile_ray_version() -> str:
    return re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)


def job_specs(doc: dict) -> list[dict]:
    """The RayJob specs in a manifest: a RayJob's own, a RayCronJob's template, none in a RayCluster."""
    if doc["kind"] == "RayCluster":
        return []
    return [doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]]


def cluster_specs(doc: dict) -> list[dict]:
    return [job["rayClusterSpec"] for job in job_specs(doc)] or [doc["spec"]]


def test_every_kind_is_shipped():
    assert sorted(doc["kind"] for _, doc in documents()) == ["RayCluster", "RayCronJob", "RayJob", "RayJob"]


@pytest.mark.parametrize("name, doc", documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid_against_the_kuberay_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []
    metadata_name = doc["metadata"].get("name") or doc["metadata"]["generateName"] + "x1y2z"  # + 5 random
    assert len(metadata_name) <= MAX_NAME[doc["kind"]] and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", metadata_name)
    for job in job_specs(doc):
        if job.get("ttlSecondsAfterFinished", 0) > 0:
            assert job["shutdownAfterJobFinishes"] is True  # else the operator rejects the RayJob
        assert job["backoffLimit"] >= 1  # a retry resumes from the output's manifest


def test_the_strict_schema_catches_misspelt_and_mistyped_fields():
    job = next(d for n, d in documents() if d["kind"] == "RayJob")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(misspelt))
    unquoted = copy.deepcopy(job)
    unquoted["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams.num-cpus" in e for e in schema_errors(unquoted))
    worker = copy.deepcopy(job)
    del worker["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in schema_errors(worker))


@pytest.mark.parametrize("name, doc", documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifests_run_this_repositorys_image_and_ray_version(name, doc):
    for spec in cluster_specs(doc):
        assert spec["rayVersion"] == dockerfile_ray_version()
        assert spec["enableInTreeAutoscaling"] is True
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu_groups and all(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups)
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                assert container["image"] == f"strata:{__version__}"  # what infra/Dockerfile's docs tag
                assert {"containerPort": 8080, "name": "metrics"} in container["ports"]


def test_dockerfile_uses_the_official_ray_gpu_image_of_the_pinned_ray():
    text = DOCKERFILE.read_text()
    version = dockerfile_ray_version()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in text
    pins = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    ray_pin = next(r for r in pins if r.name == "ray")
    assert ray_pin.specifier.contains(version), f"Ray {version} in the image is outside pyproject's {ray_pin}"
    assert f"docker build -f infra/Dockerfile -t strata:{__version__} ." in text
    for source in re.findall(r"^COPY \S+ (.+) \S+$", text, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"
    assert re.search(r"^WORKDIR /home/ray/strata$", text, re.M)


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in documents() if job_specs(d)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_entrypoints_exist_and_their_configs_load(name, doc):
    for job in job_specs(doc):
        python, script, config, *rest = shlex.split(job["entrypoint"])
        assert python == "python"
        assert script.startswith("/home/ray/strata/jobs/") and (ROOT / script.removeprefix("/home/ray/strata/")).is_file()
        assert config.startswith("/home/ray/strata/configs/")
        overrides = [value for flag, value in zip(rest[::2], rest[1::2]) if flag == "--set"]
        assert len(overrides) * 2 == len(rest)
        loaded = load_config(ROOT / config.removeprefix("/home/ray/strata/"), overrides)
        assert loaded.output.uri.startswith("s3://") and loaded.input.uri.startswith("s3://")
        assert loaded.compute.max_replicas is not None  # the GPU group autoscales
    expected = "scheduled.py" if doc["kind"] == "RayCronJob" or "generateName" in doc["metadata"] else "embed.py"
    assert all(shlex.split(job["entrypoint"])[1].endswith(expected) for job in job_specs(doc))


def test_cronjob_fallback_creates_the_scheduled_rayjob_with_just_enough_rights():
    """Where RayCronJob is unavailable, a CronJob's pod `kubectl create`s the RayJob template."""
    cronjob = by_kind("CronJob")["strata-nightly"]
    assert cronjob["apiVersion"] == "batch/v1" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    ray_cronjob = next(d for _, d in documents() if d["kind"] == "RayCronJob")
    assert cronjob["spec"]["schedule"] == ray_cronjob["spec"]["schedule"]  # the same nightly slot either way
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    container = pod["containers"][0]
    command = container["command"]
    assert command[:3] == ["kubectl", "create", "-f"]  # create, not apply: apply cannot use generateName
    mount = next(m for m in container["volumeMounts"] if command[3].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    template = by_kind("ConfigMap")[volume["configMap"]["name"]]["data"][command[3].rsplit("/", 1)[1]]
    assert yaml.safe_load(template)["kind"] == "RayJob" and "generateName" in yaml.safe_load(template)["metadata"]

    account = pod["serviceAccountName"]
    assert account in by_kind("ServiceAccount")
    binding = next(b for b in by_kind("RoleBinding").values()
                   if {"kind": "ServiceAccount", "name": account} in b["subjects"])
    role = by_kind("Role")[binding["roleRef"]["name"]]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
