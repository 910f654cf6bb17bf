"""Offline checks of the Kubernetes side: deploy/rayservice.yaml, deploy/autoscaling.yaml,
deploy/redis.yaml and deploy/Dockerfile.

The RayService manifests are validated against KubeRay's own CRD schema (vendored in
tests/deploy/kuberay, see its README), made strict the way `kubectl apply` (server-side field
validation) is: an unknown field is an error. Their serveConfigV2 is checked like every Serve
config in test_configs.py, and against the deploy/configs/ file it embeds.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.serve.config import AutoscalingConfig

from serve_app.common import malloc
from serve_app.common.config import ENV_MODEL_DIR, is_redis_url, load_config
from tests.deploy.files import (
    AUTOSCALING,
    CRD_PATH,
    DOCKERFILE,
    DOCKERIGNORE,
    GPU,
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    RAYSERVICE,
    REDIS,
    ROOT,
    app,
    cluster,
    constraints,
    containers,
    deployment,
    differences,
    dockerfile_base,
    dockerfile_env,
    dockerfile_python,
    env,
    gpu_groups,
    gpus_per_replica,
    load_yaml,
    manifest,
    name,
    pod,
    pyproject,
    requirement,
    serve_config_of,
)

DEPRECATED_FIELDS = ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold")
MAX_NAME_LENGTH = 53
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# tests/deploy/kuberay/README.md: KubeRay v1.7.0's file, unchanged.
CRD_SHA256 = "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"

# Which deploy/configs/ file each manifest's serveConfigV2 is, and the only ways it may differ
# from it, as documented in each manifest's header comment (dotted paths; applications and
# deployments keyed by name).
FOUR_GPUS = ROOT / "deploy/configs/4gpu.yaml"
_MODEL_PATH = "applications.*.args.model.path"
_MODEL_DEP = f"applications.*.deployments.{MODEL_DEPLOYMENT}"
_INGRESS_DEP = f"applications.*.deployments.{INGRESS_DEPLOYMENT}"
# A cluster's differences from a one-machine config: the shared url-result store, and the
# ingress replicated over nodes (docs/deployment.md#what-survives-what).
_CLUSTER = (
    "applications.*.args.storage.*",
    f"{_INGRESS_DEP}.num_replicas",
    f"{_INGRESS_DEP}.autoscaling_config.*",
    f"{_INGRESS_DEP}.max_replicas_per_node",
)
EMBEDS: dict[Path, tuple[Path, tuple[str, ...]]] = {
    RAYSERVICE: (FOUR_GPUS, (_MODEL_PATH, *_CLUSTER)),
    AUTOSCALING: (
        FOUR_GPUS,
        (
            _MODEL_PATH,
            *_CLUSTER,
            f"{_MODEL_DEP}.num_replicas",
            f"{_MODEL_DEP}.autoscaling_config",
            f"{_MODEL_DEP}.autoscaling_config.*",
        ),
    ),
}
MANIFESTS = list(EMBEDS)


# --- the CRD schema, made strict -------------------------------------------------------------


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Close every object schema that lists its properties, as the API server does.

    Also spell out `x-kubernetes-int-or-string` as integer-or-string where the CRD gives no
    anyOf of its own (jsonschema does not know the extension).
    """
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    has_fields = "properties" in schema and "additionalProperties" not in schema
    if has_fields and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for sub in schema.get("properties", {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft202012Validator:
    crd = load_yaml(CRD_PATH)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(validator: jsonschema.Draft202012Validator, document: Any) -> list[str]:
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(document)
    )


def test_the_vendored_crd_is_kuberays_file_unchanged() -> None:
    assert hashlib.sha256(CRD_PATH.read_bytes()).hexdigest() == CRD_SHA256
    readme = (CRD_PATH.parent / "README.md").read_text()
    assert CRD_SHA256 in readme and "v1.7.0" in readme and "Apache License 2.0" in readme
    assert "Apache License" in (CRD_PATH.parent / "LICENSE").read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_manifest_matches_the_rayservice_crd(
    path: Path, rayservice_validator: jsonschema.Draft202012Validator
) -> None:
    document = manifest(path)
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == "RayService"
    assert _schema_errors(rayservice_validator, document) == []


def test_strict_crd_schema_catches_typos_and_wrong_types(
    rayservice_validator: jsonschema.Draft202012Validator,
) -> None:
    # The validator must have teeth: the CRD alone accepts any unknown field.
    document = copy.deepcopy(manifest(RAYSERVICE))
    document["spec"]["serveConfigv2"] = "typo"
    document["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    worker = document["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] = "two"
    errors = _schema_errors(rayservice_validator, document)
    assert any("serveConfigv2" in e for e in errors), errors
    assert any("rayStartParams.num-gpus" in e for e in errors), errors
    assert any(GPU in e for e in errors), errors


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_manifest_name_and_no_deprecated_fields(path: Path) -> None:
    manifest_name = manifest(path)["metadata"]["name"]
    assert len(manifest_name) <= MAX_NAME_LENGTH
    assert DNS_LABEL.match(manifest_name), manifest_name
    text = path.read_text()
    for field in DEPRECATED_FIELDS:
        assert field not in text, f"{name(path)} mentions deprecated {field}"


# --- serveConfigV2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_serve_config_v2_is_the_configs_file_it_names(path: Path) -> None:
    reference_path, allowed = EMBEDS[path]
    ours, reference = serve_config_of(path), serve_config_of(reference_path)
    assert name(reference_path) in path.read_text(), "the header names the embedded file"
    unexpected = {
        d for d in differences(ours, reference) if not any(fnmatch.fnmatch(d, p) for p in allowed)
    }
    assert unexpected == set(), f"{name(path)} drifted from {name(reference_path)}"
    # Spelled out, the parts that must agree:
    assert app(ours)["import_path"] == app(reference)["import_path"]
    names = [d["name"] for d in app(ours)["deployments"]]
    assert names == [d["name"] for d in app(reference)["deployments"]]
    assert names == [MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT]
    for deployment_name in names:
        gpus = deployment(ours, deployment_name)["ray_actor_options"]["num_gpus"]
        assert gpus == deployment(reference, deployment_name)["ray_actor_options"]["num_gpus"]


def test_autoscaling_example_scales_the_model_only() -> None:
    config = serve_config_of(AUTOSCALING)
    model = deployment(config, MODEL_DEPLOYMENT)
    assert "num_replicas" not in model
    scaling = AutoscalingConfig.model_validate(model["autoscaling_config"])
    assert 1 <= scaling.min_replicas <= scaling.max_replicas
    assert scaling.target_ongoing_requests == pytest.approx(1.0)
    assert scaling.upscale_delay_s < scaling.downscale_delay_s
    assert cluster(AUTOSCALING)["enableInTreeAutoscaling"] is True
    assert cluster(RAYSERVICE).get("enableInTreeAutoscaling", False) is False


# --- no single point of failure -------------------------------------------------------------


def _nodes(path: Path, *, bound: str) -> int:
    """Ray nodes of the cluster: the head and every worker pod (`bound` minReplicas or
    maxReplicas of each group)."""
    return 1 + sum(group[bound] for group in cluster(path)["workerGroupSpecs"])


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_the_ingress_is_replicated_over_nodes_and_scales(path: Path) -> None:
    config = serve_config_of(path)
    ingress = deployment(config, INGRESS_DEPLOYMENT)
    assert "num_replicas" not in ingress
    scaling = AutoscalingConfig.model_validate(ingress["autoscaling_config"])
    assert scaling.min_replicas >= 2 and scaling.max_replicas > scaling.min_replicas
    assert scaling.target_ongoing_requests < ingress["max_ongoing_requests"]
    # One per node: losing a node loses one replica; the always-there nodes hold them all.
    assert ingress["max_replicas_per_node"] == 1
    assert _nodes(path, bound="minReplicas") >= scaling.max_replicas
    assert config["proxy_location"] == "EveryNode"
    (cpu,) = [g for g in cluster(path)["workerGroupSpecs"] if g not in gpu_groups(path)]
    assert cpu["minReplicas"] >= 2
    spread = pod(cpu)["affinity"]["podAntiAffinity"]
    terms = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == {
        "ray.io/group": cpu["groupName"]
    }


def _redis_documents() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all(REDIS.read_text()))
    return {d["kind"]: d for d in documents}


def _redis_service() -> tuple[str, int]:
    service = _redis_documents()["Service"]
    (port,) = service["spec"]["ports"]
    return service["metadata"]["name"], port["port"]


def test_the_redis_manifest_is_a_service_over_a_durable_password_protected_redis() -> None:
    documents = _redis_documents()
    assert set(documents) == {"Service", "PersistentVolumeClaim", "Deployment"}
    deployment_ = documents["Deployment"]
    labels = deployment_["spec"]["template"]["metadata"]["labels"]
    assert documents["Service"]["spec"]["selector"].items() <= labels.items()
    assert deployment_["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment_["spec"]["strategy"]["type"] == "Recreate"  # one writer per volume
    (container,) = pod(deployment_["spec"])["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env(container)["REDIS_PASSWORD"]["secretKeyRef"] == _REDIS_SECRET
    (volume,) = pod(deployment_["spec"])["volumes"]
    claim = documents["PersistentVolumeClaim"]["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert documents["Service"]["spec"]["ports"][0]["targetPort"] in ports


_REDIS_SECRET = {"name": "qwen-image-edit-redis", "key": "password"}


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_gcs_fault_tolerance_and_url_results_use_the_redis(path: Path) -> None:
    host, port = _redis_service()
    options = cluster(path)["gcsFaultToleranceOptions"]
    assert options["backend"] == "redis"
    assert options["redisAddress"] == f"{host}:{port}"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == _REDIS_SECRET
    storage = load_config(app(serve_config_of(path))["args"], environ={}).storage
    assert is_redis_url(storage.url)
    assert storage.url.startswith(f"redis://{host}:{port}/")
    assert not storage.url.endswith("/0"), "database 0 is the GCS's"
    assert storage.password_env
    # Every container has the password where the config says: the ingress may run on any node.
    for container in containers(path):
        assert env(container)[storage.password_env]["secretKeyRef"] == _REDIS_SECRET
    # The store's bound fits in Redis's memory beside the GCS tables.
    (redis,) = pod(_redis_documents()["Deployment"]["spec"])["containers"]
    maxmemory = redis["args"][redis["args"].index("--maxmemory") + 1]
    assert maxmemory.endswith("gb") and storage.max_total_bytes < int(maxmemory[:-2]) * 1024**3


# --- cluster shape ---------------------------------------------------------------------------


def _quantity(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_gpu_workers_fit_the_model_replicas(path: Path) -> None:
    config = serve_config_of(path)
    model = deployment(config, MODEL_DEPLOYMENT)
    num_gpus = gpus_per_replica(config)
    ranks = num_gpus // model["ray_actor_options"]["num_gpus"]
    assert num_gpus >= 1
    (group,) = gpu_groups(path)
    (container,) = pod(group)["containers"]
    limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
    gpus_per_pod = int(limits[GPU])
    # Extended resources: a request, if any, must equal the limit.
    assert int(requests.get(GPU, gpus_per_pod)) == gpus_per_pod
    # Whole replicas per pod, no stranded GPUs.
    assert gpus_per_pod % num_gpus == 0, (gpus_per_pod, num_gpus)
    per_pod = gpus_per_pod // num_gpus
    assert _quantity(limits["cpu"]) >= per_pod * ranks * model["ray_actor_options"]["num_cpus"]
    assert (
        group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    )
    if "autoscaling_config" in model:
        scaling = model["autoscaling_config"]
        assert group["maxReplicas"] * per_pod >= scaling["max_replicas"]
        assert group["minReplicas"] * per_pod >= scaling["min_replicas"]
    else:
        assert group["replicas"] * per_pod >= model["num_replicas"]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_head_is_cpu_only_and_serves_on_the_config_port(path: Path) -> None:
    head = cluster(path)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert GPU not in container["resources"].get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["serve"] == serve_config_of(path)["http_options"]["port"]
    assert ports["dashboard"] == 8265
    assert serve_config_of(path)["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_model_volume_is_mounted_read_only_where_qwen_model_dir_points(path: Path) -> None:
    args = app(serve_config_of(path))["args"]
    model_dirs = {env(c).get(ENV_MODEL_DIR) for c in containers(path)}
    (model_dir,) = model_dirs  # the same value in every container, build and replicas agree
    assert model_dir == args["model"]["path"]
    assert load_config(args, environ={ENV_MODEL_DIR: model_dir}).model.path == model_dir
    # Weights from the volume only: the Hub is never asked.
    assert {env(c).get("HF_HUB_OFFLINE") for c in containers(path)} == {"1"}
    for group in gpu_groups(path):
        spec = pod(group)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = [
            m
            for m in container["volumeMounts"]
            if PurePosixPath(model_dir).is_relative_to(m["mountPath"]) and m["mountPath"] != "/"
        ]
        assert len(mounts) == 1, f"no volume mounted at {model_dir}"
        assert mounts[0]["readOnly"] is True
        volume = volumes[mounts[0]["name"]]
        assert volume["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_ray_token_auth_and_versions_agree(path: Path) -> None:
    spec = cluster(path)
    # KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every container; a hand-set
    # RAY_AUTH_MODE must not contradict it.
    assert spec["authOptions"]["mode"] == "token"
    for container in containers(path):
        assert env(container).get("RAY_AUTH_MODE", "token") == "token"
    ray_version = spec["rayVersion"]
    assert Version(ray_version) >= Version("2.52.0")  # token auth
    assert requirement("ray", "serve").specifier.contains(ray_version)
    assert ray_version == dockerfile_base()["ray"] == constraints()["ray"]


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_every_container_runs_the_project_image(path: Path) -> None:
    images = {c["image"] for c in containers(path)}
    (image,) = images
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("/qwen-image-edit-serve")
    assert tag == pyproject()["project"]["version"]


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_base_matches_the_pinned_ray_and_python() -> None:
    base = dockerfile_base()
    ray = requirement("ray", "serve")
    assert ray.specifier.contains(base["ray"]), (
        f"rayproject/ray:{base['ray']} is outside pyproject's {ray}"
    )
    assert base["ray"] == constraints()["ray"]
    supported = Requirement(f"python{pyproject()['project']['requires-python']}").specifier
    assert supported.contains(dockerfile_python())


def test_dockerfile_tunes_malloc_as_the_launcher_does() -> None:
    # Every process of the container, Serve's HTTP proxy included, starts with the settings
    # that the replicas also set in themselves (serve_app.common.malloc).
    assert dockerfile_env()["GLIBC_TUNABLES"] == malloc.GLIBC_TUNABLES
    assert malloc.CLUSTER_ENV == {"GLIBC_TUNABLES": malloc.GLIBC_TUNABLES}
    from serve_app.common.links import PROXY_ENV

    assert {name: dockerfile_env()[name] for name in PROXY_ENV} == PROXY_ENV


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_every_proxy_answers_its_own_errors_as_json(path: Path) -> None:
    # Every Ray container runs a Serve proxy (EveryNode); each must load the middleware, even
    # on a cluster of another image than deploy/Dockerfile's.
    from serve_app.common.links import PROXY_CALLBACK_ENV, PROXY_ENV

    for container in containers(path):
        assert env(container)[PROXY_CALLBACK_ENV] == PROXY_ENV[PROXY_CALLBACK_ENV]


def test_dockerfile_installs_the_package_without_weights() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install[^\n]*(\s\.|\./src)", text.replace("\\\n", " ")), text
    for download in ("hf download", "huggingface-cli", "snapshot_download", "from_pretrained"):
        assert download not in text


def test_dockerignore_lets_the_copied_sources_through() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allowlist keeps .venv, .git and weights out of the context"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    for line in DOCKERFILE.read_text().splitlines():
        if line.upper().startswith("COPY") and "--from" not in line:
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            assert set(sources) <= allowed, f"{line!r}: .dockerignore excludes some of {sources}"
