"""The deployment files under test and how to read them (shared by tests/deploy)."""

from __future__ import annotations

import functools
import itertools
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = Path(__file__).resolve().parent / "kuberay" / "ray.io_rayservices.yaml"
SERVE_CONFIG = ROOT / "serve_config.yaml"
LOCAL_CONFIG = ROOT / "deploy/local.yaml"
SHAPE_CONFIGS = sorted((ROOT / "deploy/configs").glob("*.yaml"))
RAYSERVICE = ROOT / "deploy/rayservice.yaml"
AUTOSCALING = ROOT / "deploy/autoscaling.yaml"
REDIS = ROOT / "deploy/redis.yaml"
DOCKERFILE = ROOT / "deploy/Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "deploy/constraints-gpu.txt"
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"

MODEL_DEPLOYMENT = "QwenImageEditModel"
INGRESS_DEPLOYMENT = "OpenAIIngress"
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


@functools.cache
def manifest(path: Path) -> dict[str, Any]:
    return load_yaml(path)


def serve_config_of(path: Path) -> dict[str, Any]:
    """A Serve config file, or the serveConfigV2 string of a RayService manifest."""
    data = manifest(path)
    if data.get("kind") == "RayService":
        return yaml.safe_load(data["spec"]["serveConfigV2"])
    return data


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def app(config: Mapping[str, Any]) -> dict[str, Any]:
    (application,) = config["applications"]
    return application


def deployment(config: Mapping[str, Any], deployment_name: str) -> dict[str, Any]:
    return next(d for d in app(config)["deployments"] if d["name"] == deployment_name)


def gpus_per_replica(config: Mapping[str, Any]) -> int:
    """The model replica's GPUs: its num_gpus, times its ranks when `model.parallel` has several
    (the builder makes the replica a placement group of one bundle per rank)."""
    ranks = (app(config)["args"].get("model", {}).get("parallel") or {}).get("gpus", 1)
    return int(ranks * deployment(config, MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpus"])


def cluster(path: Path) -> dict[str, Any]:
    return manifest(path)["spec"]["rayClusterConfig"]


def pod(group: Mapping[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def containers(path: Path) -> Iterator[dict[str, Any]]:
    spec = cluster(path)
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def gpu_groups(path: Path) -> list[dict[str, Any]]:
    return [
        group
        for group in cluster(path)["workerGroupSpecs"]
        if any(GPU in c.get("resources", {}).get("limits", {}) for c in pod(group)["containers"])
    ]


def env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
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
            flat.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> set[str]:
    flat_a, flat_b = flatten(a), flatten(b)
    return {k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k, ...) != flat_b.get(k, ...)}


# --- packaging -------------------------------------------------------------------------------


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def requirements(extra: str | None = None) -> list[Requirement]:
    """The base dependencies, or one extra's."""
    project = pyproject()["project"]
    items = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in items]


def requirement(package: str, extra: str | None = None) -> Requirement:
    return next(r for r in requirements(extra) if r.name == package)


def constraints() -> dict[str, str]:
    """deploy/constraints-gpu.txt as {package: exact version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            req = Requirement(text)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{text}: constraints pin exact versions"
            pins[req.name] = spec.version
    return pins


_FROM = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", re.MULTILINE | re.IGNORECASE)
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-gpu$")


def dockerfile_base() -> re.Match[str]:
    bases = _FROM.findall(DOCKERFILE.read_text())
    assert bases, "deploy/Dockerfile has no FROM"
    match = RAY_IMAGE.match(bases[-1])
    assert match, f"the final stage must build FROM rayproject/ray:X.Y.Z-pyNNN-gpu, not {bases[-1]}"
    return match


def dockerfile_python() -> str:
    py = dockerfile_base()["py"]
    return f"{py[0]}.{py[1:]}"


def dockerfile_extras() -> list[str]:
    (extras,) = re.findall(r"^ARG EXTRAS=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    return extras.split(",")


def dockerfile_pip_install() -> str:
    """The Dockerfile's `pip install` command, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (command,) = re.findall(r"pip install [^&\n]*", text)
    return command


def dockerfile_env() -> dict[str, str]:
    """The Dockerfile's `ENV NAME=value ...` settings, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    settings: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.MULTILINE):
        settings.update(pair.split("=", 1) for pair in line.split())
    return settings


LIGHTNING_MARK = "The 4-step Lightning model instead: uncomment these lines"


def commented_lightning(path: Path) -> dict[str, Any]:
    """The model keys a one-card config carries commented out under `LIGHTNING_MARK`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if LIGHTNING_MARK in line)
    prefix = lines[start][: lines[start].index("#")] + "# "
    block = list(itertools.takewhile(lambda line: line.startswith(prefix), lines[start:]))
    yaml_lines = [line.removeprefix(prefix) for line in block]
    snippet = yaml.safe_load("\n".join(yaml_lines[yaml_lines.index("loras:") :]))
    assert isinstance(snippet, dict)
    return snippet
