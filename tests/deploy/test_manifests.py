"""Offline checks of the deployment files: deploy/*.yaml, serve_config.yaml, deploy/Dockerfile.

The RayService manifests are validated against KubeRay's own CRD schema (../shared/kuberay,
beside the clone), made strict the way `kubectl apply` (server-side field validation) is:
an unknown field is an error. Serve configs are validated with Ray's ServeDeploySchema, also
made strict (pydantic ignores unknown keys, so a typo would silently fall back to a default),
and their `args` with our own config loader.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.common.config import ENV_MODEL_DIR, load_config

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT.parent / "shared/kuberay/ray.io_rayservices.yaml"
SERVE_CONFIG = ROOT / "serve_config.yaml"
LOCAL_CONFIG = ROOT / "deploy/local.yaml"
RAYSERVICE = ROOT / "deploy/rayservice.yaml"
AUTOSCALING = ROOT / "deploy/autoscaling.yaml"
DOCKERFILE = ROOT / "deploy/Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

MODEL_DEPLOYMENT = "QwenImageEditModel"
INGRESS_DEPLOYMENT = "OpenAIIngress"
GPU = "nvidia.com/gpu"
DEPRECATED_FIELDS = ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold")
MAX_NAME_LENGTH = 53
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# The only ways a manifest's serveConfigV2 may differ from serve_config.yaml, as documented in
# each manifest's header comment (dotted paths; applications and deployments keyed by name).
_MODEL_PATH = "applications.*.args.model.path"
_MODEL_DEP = f"applications.*.deployments.{MODEL_DEPLOYMENT}"
ALLOWED_DIFFERENCES: dict[Path, tuple[str, ...]] = {
    RAYSERVICE: (_MODEL_PATH,),
    AUTOSCALING: (
        _MODEL_PATH,
        f"{_MODEL_DEP}.num_replicas",
        f"{_MODEL_DEP}.autoscaling_config",
        f"{_MODEL_DEP}.autoscaling_config.*",
    ),
}
MANIFESTS = list(ALLOWED_DIFFERENCES)
SERVE_CONFIGS = [SERVE_CONFIG, LOCAL_CONFIG, RAYSERVICE, AUTOSCALING]


# --- loading ---------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


@functools.cache
def _manifest(path: Path) -> dict[str, Any]:
    return _load_yaml(path)


def serve_config_of(path: Path) -> dict[str, Any]:
    """A Serve config file, or the serveConfigV2 string of a RayService manifest."""
    data = _manifest(path)
    if data.get("kind") == "RayService":
        return yaml.safe_load(data["spec"]["serveConfigV2"])
    return data


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _app(config: Mapping[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return app


def _deployment(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in _app(config)["deployments"] if d["name"] == name)


def _cluster(path: Path) -> dict[str, Any]:
    return _manifest(path)["spec"]["rayClusterConfig"]


def _containers(path: Path) -> Iterator[dict[str, Any]]:
    cluster = _cluster(path)
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def _gpu_groups(path: Path) -> list[dict[str, Any]]:
    return [
        group
        for group in _cluster(path)["workerGroupSpecs"]
        if any(GPU in c.get("resources", {}).get("limits", {}) for c in _pod(group)["containers"])
    ]


def _pod(group: Mapping[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def _ray_requirement() -> Requirement:
    deps = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    return next(r for r in deps if r.name == "ray")


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
    if not CRD_PATH.is_file():
        pytest.fail(
            f"KubeRay CRD not found at {CRD_PATH}: the deploy tests need the shared folder "
            "checked out beside this repository (../shared/kuberay/ray.io_rayservices.yaml)."
        )
    crd = _load_yaml(CRD_PATH)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(validator: jsonschema.Draft202012Validator, document: Any) -> list[str]:
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(document)
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_manifest_matches_the_rayservice_crd(
    path: Path, rayservice_validator: jsonschema.Draft202012Validator
) -> None:
    manifest = _manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert _schema_errors(rayservice_validator, manifest) == []


def test_strict_crd_schema_catches_typos_and_wrong_types(
    rayservice_validator: jsonschema.Draft202012Validator,
) -> None:
    # The validator must have teeth: the CRD alone accepts any unknown field.
    manifest = copy.deepcopy(_manifest(RAYSERVICE))
    manifest["spec"]["serveConfigv2"] = "typo"
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    worker = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] = "two"
    errors = _schema_errors(rayservice_validator, manifest)
    assert any("serveConfigv2" in e for e in errors), errors
    assert any("rayStartParams.num-gpus" in e for e in errors), errors
    assert any(GPU in e for e in errors), errors


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_manifest_name_and_no_deprecated_fields(path: Path) -> None:
    name = _manifest(path)["metadata"]["name"]
    assert len(name) <= MAX_NAME_LENGTH
    assert DNS_LABEL.match(name), name
    text = path.read_text()
    for field in DEPRECATED_FIELDS:
        assert field not in text, f"{_name(path)} mentions deprecated {field}"


# --- Serve configs ---------------------------------------------------------------------------


def _model_candidates(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation admits (through Optional, Union, List)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _model_candidates(arg)]


def _unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys pydantic would silently ignore. `args` stays out: load_config forbids extras."""
    if not isinstance(data, Mapping):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    unknown = [f"{where}{key}" for key in data if key not in known]
    for key, value in data.items():
        if key not in fields:
            continue
        candidates = _model_candidates(fields[key].annotation)
        if len(candidates) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            suffix = f"[{i}]" if isinstance(value, list) else ""
            unknown += _unknown_keys(candidates[0], item, f"{where}{key}{suffix}.")
    return unknown


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_name)
def test_serve_config_is_valid_for_ray(path: Path) -> None:
    config = serve_config_of(path)
    ServeDeploySchema.model_validate(config)
    assert _unknown_keys(ServeDeploySchema, config) == []
    for deployment in _app(config)["deployments"]:
        if "autoscaling_config" in deployment:
            # ServeDeploySchema takes autoscaling_config as a plain dict: check it here.
            AutoscalingConfig.model_validate(deployment["autoscaling_config"])
            assert _unknown_keys(AutoscalingConfig, deployment["autoscaling_config"]) == []


def test_strict_serve_check_catches_typos() -> None:
    config = copy.deepcopy(serve_config_of(SERVE_CONFIG))
    _deployment(config, MODEL_DEPLOYMENT)["max_queued_request"] = 8
    _deployment(config, MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpu"] = 1
    assert _unknown_keys(ServeDeploySchema, config) == [
        "applications[0].deployments[0].max_queued_request",
        "applications[0].deployments[0].ray_actor_options.num_gpu",
    ]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_name)
def test_builder_accepts_the_args(path: Path) -> None:
    app = _app(serve_config_of(path))
    module_name, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))
    load_config(app["args"], environ={})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaves; named lists (applications, deployments) keyed by name."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "name" in v for v in value)
    ):
        value = {v["name"]: v for v in value}
    if isinstance(value, dict):
        flat: dict[str, Any] = {prefix: {}} if not value and prefix else {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> set[str]:
    flat_a, flat_b = _flatten(a), _flatten(b)
    return {k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k, ...) != flat_b.get(k, ...)}


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_serve_config_v2_is_serve_config_yaml(path: Path) -> None:
    ours, reference = serve_config_of(path), serve_config_of(SERVE_CONFIG)
    allowed = ALLOWED_DIFFERENCES[path]
    unexpected = {
        d for d in _differences(ours, reference) if not any(fnmatch.fnmatch(d, p) for p in allowed)
    }
    assert unexpected == set(), f"{_name(path)} drifted from serve_config.yaml"
    # Spelled out, the parts that must agree:
    assert _app(ours)["import_path"] == _app(reference)["import_path"]
    names = [d["name"] for d in _app(ours)["deployments"]]
    assert names == [d["name"] for d in _app(reference)["deployments"]]
    assert names == [MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT]
    for name in names:
        gpus = _deployment(ours, name)["ray_actor_options"]["num_gpus"]
        assert gpus == _deployment(reference, name)["ray_actor_options"]["num_gpus"]


def test_serve_config_diff_sees_a_changed_deployment() -> None:
    reference = serve_config_of(SERVE_CONFIG)
    changed = copy.deepcopy(reference)
    _deployment(changed, MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpus"] = 1
    assert _differences(changed, reference) == {
        f"applications.qwen-image-edit.deployments.{MODEL_DEPLOYMENT}.ray_actor_options.num_gpus"
    }


def test_autoscaling_example_scales_the_model_only() -> None:
    config = serve_config_of(AUTOSCALING)
    model = _deployment(config, MODEL_DEPLOYMENT)
    assert "num_replicas" not in model
    scaling = AutoscalingConfig.model_validate(model["autoscaling_config"])
    assert 1 <= scaling.min_replicas <= scaling.max_replicas
    assert scaling.target_ongoing_requests == pytest.approx(1.0)
    assert scaling.upscale_delay_s < scaling.downscale_delay_s
    assert "autoscaling_config" not in _deployment(config, INGRESS_DEPLOYMENT)
    assert _cluster(AUTOSCALING)["enableInTreeAutoscaling"] is True
    assert _cluster(RAYSERVICE).get("enableInTreeAutoscaling", False) is False


# --- cluster shape ---------------------------------------------------------------------------


def _quantity(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_gpu_workers_fit_the_model_replicas(path: Path) -> None:
    model = _deployment(serve_config_of(path), MODEL_DEPLOYMENT)
    num_gpus = model["ray_actor_options"]["num_gpus"]
    assert num_gpus >= 1
    (group,) = _gpu_groups(path)
    (container,) = _pod(group)["containers"]
    limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
    gpus_per_pod = int(limits[GPU])
    # Extended resources: a request, if any, must equal the limit.
    assert int(requests.get(GPU, gpus_per_pod)) == gpus_per_pod
    # Whole replicas per pod, no stranded GPUs.
    assert gpus_per_pod % num_gpus == 0, (gpus_per_pod, num_gpus)
    per_pod = gpus_per_pod // num_gpus
    assert _quantity(limits["cpu"]) >= per_pod * model["ray_actor_options"]["num_cpus"]
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


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_head_is_cpu_only_and_serves_on_the_config_port(path: Path) -> None:
    head = _cluster(path)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert GPU not in container["resources"].get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["serve"] == serve_config_of(path)["http_options"]["port"]
    assert ports["dashboard"] == 8265
    assert serve_config_of(path)["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_model_volume_is_mounted_read_only_where_qwen_model_dir_points(path: Path) -> None:
    args = _app(serve_config_of(path))["args"]
    model_dirs = {_env(c).get(ENV_MODEL_DIR) for c in _containers(path)}
    (model_dir,) = model_dirs  # the same value in every container, build and replicas agree
    assert model_dir == args["model"]["path"]
    assert load_config(args, environ={ENV_MODEL_DIR: model_dir}).model.path == model_dir
    for group in _gpu_groups(path):
        pod = _pod(group)
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = [
            m
            for m in container["volumeMounts"]
            if PurePosixPath(model_dir).is_relative_to(m["mountPath"]) and m["mountPath"] != "/"
        ]
        assert len(mounts) == 1, f"no volume mounted at {model_dir}"
        assert mounts[0]["readOnly"] is True
        volume = volumes[mounts[0]["name"]]
        assert volume["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_ray_token_auth_and_versions_agree(path: Path) -> None:
    cluster = _cluster(path)
    # KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every container; a hand-set
    # RAY_AUTH_MODE must not contradict it.
    assert cluster["authOptions"]["mode"] == "token"
    for container in _containers(path):
        assert _env(container).get("RAY_AUTH_MODE", "token") == "token"
    ray_version = cluster["rayVersion"]
    assert Version(ray_version) >= Version("2.52.0")  # token auth
    assert _ray_requirement().specifier.contains(ray_version)
    assert ray_version == _dockerfile_ray_version()


@pytest.mark.parametrize("path", MANIFESTS, ids=_name)
def test_every_container_runs_the_project_image(path: Path) -> None:
    images = {c["image"] for c in _containers(path)}
    (image,) = images
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("/qwen-image-edit-serve")
    assert tag == _pyproject()["project"]["version"]


# --- Dockerfile ------------------------------------------------------------------------------

_FROM = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", re.MULTILINE | re.IGNORECASE)
_RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-gpu$")


def _dockerfile_base() -> re.Match[str]:
    bases = _FROM.findall(DOCKERFILE.read_text())
    assert bases, "deploy/Dockerfile has no FROM"
    match = _RAY_IMAGE.match(bases[-1])
    assert match, f"the final stage must build FROM rayproject/ray:X.Y.Z-pyNNN-gpu, not {bases[-1]}"
    return match


def _dockerfile_ray_version() -> str:
    return _dockerfile_base()["ray"]


def test_dockerfile_base_matches_the_pinned_ray_and_python() -> None:
    base = _dockerfile_base()
    assert _ray_requirement().specifier.contains(base["ray"]), (
        f"rayproject/ray:{base['ray']} is outside pyproject's {_ray_requirement()}"
    )
    python = f"{base['py'][0]}.{base['py'][1:]}"
    assert Requirement(f"python{_pyproject()['project']['requires-python']}").specifier.contains(
        python
    )


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
