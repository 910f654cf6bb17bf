"""End-to-end benchmark of the serve app on the GPUs of this machine.

    python -m bench.run --scenario "name=1gpu,gpus=1,replicas=2,compile=1,clients=2,rounds=2" \\
                        --scenario "name=cfg2,ranks=2,compile=1" \\
                        [--steps 50] [--runs 3] [--out-dir bench/results]

For each scenario it starts the real app (`serve_app.app:build_app`, model source `synthetic`:
the full-size architecture with random weights, made on the GPUs) with `replicas` x `gpus` GPUs per
replica, waits for /ready (the replica compiles and warms up first when compile is on), sends one
short warm-up edit per replica, then times:

- HTTP end to end (httpx, multipart, as the openai client sends it, and as it does over a client
  made once whose connection is kept alive: one per client thread): a 1024x1024 edit of one
  1024x1024 reference, `steps` steps, true CFG (negative_prompt " ", true_cfg_scale 4), `runs`
  times one after another; median;
- the bare pipeline call (`EditRunner.run`) of those same requests, from the `Server-Timing`
  header of each (its `pipeline` stage, with the text-encoder / VAE encode / VAE decode / denoising
  split); serving overhead % = (HTTP - bare) / bare;
- where the overhead goes: the rest of that header (ingress parse, decode, model call, replica
  queue / wall time, encode, body; medians in `server_timing_ms_median`);
- ms per transformer forward = denoising time / (2 x steps) and achieved TFLOP/s from the FLOPs of
  a forward (`bench.flops`, text-token counts from the same tokenizer the replica uses);
- peak memory per GPU (`nvidia-smi` memory.used, sampled every 0.5 s: weights + activations +
  allocator cache + CUDA context, i.e. what a card must have; `peak_gib_per_gpu`), and one
  replica's allocator peak (`torch.cuda.max_memory_allocated`, `allocator_peak_gib_per_gpu`);
- optionally throughput: `clients` concurrent clients, `rounds` requests each (img/min).

Each scenario writes `<out-dir>/<name>.json`. Scenario keys: name, gpus (per replica), replicas,
compile (0/1), dynamic (compile_dynamic 0/1), cpp (compile_cpp_wrapper 0/1), te
(compile_text_encoder 0/1),
fp8 (quantization fp8 0/1), backend (attention backend), variant (2509/2511), clients,
rounds, steps, runs, ref (an earlier scenario's name: the first timed output, same seed and
synthetic weights, is compared with that scenario's, relative L2 error of the pixels); lora (a
recipe, e.g. lightning-4: a synthetic LoRA of rank lora_rank, default 64, on each block's 12
attention and feed-forward linears, served as its own model id with the recipe's scheduler,
steps and no CFG; the timed requests name it and leave steps and CFG to the recipe), lora_mode
(fused | hotswap: with hotswap the replica also serves the base model, and one edit right after
a base edit is timed too); for one
replica over several GPUs (one process per GPU, `model.parallel`): ranks (GPUs per replica; with
gpus=1, or gpus=0 for CPU ranks), cfg and ulysses (degrees, default auto), base (a 1-GPU
scenario's name: speedup and scaling efficiency against it), restart (1: redeploy after timing and
time the warm start, the compile cache already on the node); for one card smaller than the
GPU (docs/gpu.md#one-card): memory_cap_gib (the replica's allocator capped to this many GiB,
QWEN_CUDA_MEMORY_CAP_GIB, and model.max_memory_gib set to it; written as `memory_cap_gib`;
with fp8 also model.quantize_at_load, as the one-card configs: a `lora` is then fused into each
layer as it loads), text_encoder (resident | int8 | offload), vae_tiling (0/1), max_pixels
(headroom_max_pixels).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.flops import image_tokens, prompt_tokens, transformer_flops
from serve_app.common.timing import parse_server_timing

APP = "qwen-image-edit"
LORA_ID = "qwen-image-edit-lightning"
PROMPT = "make the sky purple"
SIZE = 1024
GiB = 1024**3


@dataclass
class Scenario:
    name: str
    gpus: int = 1
    replicas: int = 1
    compile: bool = False
    dynamic: bool | None = None  # compile_dynamic
    fp8: bool = False
    cpp: bool = False  # compile_cpp_wrapper
    te: bool = False  # compile_text_encoder
    backend: str | None = None
    variant: str = "2511"
    clients: int = 0
    rounds: int = 0
    # Ranks (one process per GPU) of one replica, model.parallel: gpus; cfg/ulysses: degrees.
    ranks: int = 1
    cfg: str = "auto"
    ulysses: str = "auto"
    # 1: after timing, redeploy and time the start again (the compile cache is warm then).
    restart: bool = False
    # Another scenario's name (one GPU): scaling efficiency = its latency / (ours x ranks).
    base: str | None = None
    steps: int | None = None
    runs: int | None = None
    # Another scenario's name: this one's first timed output is compared with that one's (same
    # seed, same synthetic weights), e.g. fp8 against bf16.
    ref: str | None = None
    # A distilled-LoRA recipe (common/recipes.py) served as LORA_ID, held as lora_mode.
    lora: str | None = None
    lora_mode: str = "fused"
    lora_rank: int = 64
    # Emulate a smaller card: the replica's allocator capped to this many GiB per GPU
    # (QWEN_CUDA_MEMORY_CAP_GIB) and model.max_memory_gib set to it; with the one-card settings.
    memory_cap_gib: float | None = None
    text_encoder: str = "resident"
    vae_tiling: bool = False
    max_pixels: int | None = None  # headroom_max_pixels

    @classmethod
    def parse(cls, spec: str) -> Scenario:
        fields: dict[str, Any] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key in (
                "gpus",
                "replicas",
                "clients",
                "rounds",
                "steps",
                "runs",
                "ranks",
                "lora_rank",
                "max_pixels",
            ):
                fields[key] = int(value)
            elif key == "memory_cap_gib":
                fields[key] = float(value)
            elif key in ("compile", "dynamic", "fp8", "cpp", "restart", "te", "vae_tiling"):
                fields[key] = value.strip().lower() in ("1", "true", "yes", "on")
            elif key in (
                "name",
                "backend",
                "variant",
                "ref",
                "cfg",
                "ulysses",
                "base",
                "lora",
                "lora_mode",
                "text_encoder",
            ):
                fields[key] = value.strip() or None
            else:
                raise ValueError(f"unknown scenario key {key!r} in {spec!r}")
        return cls(**fields)

    @property
    def model_id(self) -> str:
        return LORA_ID if self.lora else "qwen-image-edit"

    @property
    def true_cfg(self) -> bool:
        return self.lora is None

    @property
    def mode(self) -> str:
        parts = []
        if self.lora:
            parts.append(f"lora={self.lora}({self.lora_mode})")
        if self.ranks > 1:
            parts.append(f"ranks={self.ranks}(cfg={self.cfg},ulysses={self.ulysses})")
        if self.fp8:
            parts.append("fp8")
        if self.text_encoder != "resident":
            parts.append(f"text_encoder={self.text_encoder}")
        if self.vae_tiling:
            parts.append("vae_tiling")
        if self.memory_cap_gib:
            parts.append(f"cap={self.memory_cap_gib}GiB")
        parts.append(
            ("compile-dynamic" if self.dynamic else "compile") if self.compile else "eager"
        )
        if self.cpp:
            parts.append("cpp_wrapper")
        if self.te:
            parts.append("compiled-text-encoder")
        parts.append(f"attn={self.backend or 'default'}")
        return "+".join(parts)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "ray"):
        try:
            module = __import__(name)
            out[name] = str(module.__version__)
        except Exception:
            out[name] = "missing"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
    except Exception:
        pass
    return out


def serve_ingress() -> dict[str, bool]:
    """Which of Ray Serve's HTTP front ends this run used: its Python proxy actor (the default), or
    HAProxy into the ingress replica with the throughput-optimized data plane (both switched on by
    environment variables read when the Ray cluster starts; tried and not used: docs/gpu.md)."""
    on = {"1", "true", "True"}
    return {
        "haproxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") in on,
        "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") in on,
    }


def cluster_runtime_env() -> dict[str, Any]:
    """The environment the launcher and the container image give every process of a Ray cluster
    (Serve's HTTP proxy included): glibc's malloc tuned for multi-MB buffers. As a job's
    runtime_env it reaches the cluster's workers and actors, not this client."""
    from serve_app.common.malloc import CLUSTER_ENV

    return {"env_vars": dict(CLUSTER_ENV)}


class GpuSampler:
    """Peak `nvidia-smi` memory.used per GPU while running; no CUDA context in this process."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.names: dict[int, str] = {}
        self._peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> GpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def reset(self) -> None:
        with self._lock:
            self._peaks.clear()

    def peaks_gib(self) -> list[float]:
        with self._lock:
            return [round(self._peaks[i] / 1024, 2) for i in sorted(self._peaks)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,name,memory.used",
                     "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout  # fmt: skip
                with self._lock:
                    for line in text.strip().splitlines():
                        index, name, used = (x.strip() for x in line.split(","))
                        self.names[int(index)] = name
                        self._peaks[int(index)] = max(self._peaks.get(int(index), 0.0), float(used))
            except Exception:
                pass
            self._stop.wait(self.period_s)


def reference_png() -> bytes:
    """examples/input.png scaled to 1024x1024 (a photo-like image, not noise)."""
    from PIL import Image

    src = Path(__file__).resolve().parent.parent / "examples" / "input.png"
    image = Image.open(src).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A replica builds (seconds) and, with compile on, compiles and warms up (about a minute).
DEPLOY_TIMEOUT_S = 300.0
# CPU smoke tests shrink the model (--synthetic-overrides); benchmarks leave it full size.
OVERRIDES: dict[str, Any] | None = None
# --images-dir: where each scenario's first timed output goes (not committed: noise images).
IMAGES_DIR: Path | None = None
# Median latency of each finished scenario (for `base=`).
BASE_LATENCY: dict[str, float] = {}
# (variant, rank) -> the synthetic LoRA file, made once per run (on the CPU, ~850 MB at rank 64).
LORA_FILES: dict[tuple[str, int], Path] = {}


def synthetic_lora(variant: str, rank: int) -> Path:
    if (variant, rank) not in LORA_FILES:
        from serve_app.pipeline.random_weights.synthetic import build_synthetic_lora

        target = Path(f"/tmp/bench-lora-{variant}-r{rank}")
        LORA_FILES[(variant, rank)] = build_synthetic_lora(
            variant, target, rank=rank, overrides=OVERRIDES
        )
    return LORA_FILES[(variant, rank)]


def app_config(sc: Scenario, *, steps: int) -> dict[str, Any]:
    model: dict[str, Any] = {
        "source": "synthetic",
        "synthetic_variant": sc.variant,
        "device_map": "auto",
        "compile": sc.compile,
        "quantization": "fp8" if sc.fp8 else "none",
        "compile_cpp_wrapper": sc.cpp,
        "compile_text_encoder": sc.te,
        "warmup": True,
    }
    if sc.dynamic is not None:
        model["compile_dynamic"] = sc.dynamic
    if sc.text_encoder != "resident":
        model["text_encoder"] = sc.text_encoder
    if sc.vae_tiling:
        model["vae_tiling"] = True
    if sc.max_pixels:
        model["headroom_max_pixels"] = sc.max_pixels
    if sc.memory_cap_gib:
        model["max_memory_gib"] = {0: sc.memory_cap_gib}
        if sc.fp8:  # as the one-card configs: 8-bit layers made on arrival (a LoRA fused first)
            model["quantize_at_load"] = True
    if sc.backend:
        model["attention_backend"] = sc.backend
    if OVERRIDES:
        model["synthetic_overrides"] = OVERRIDES
    if sc.lora:
        lora_file = synthetic_lora(sc.variant, sc.lora_rank)
        model["loras"] = [{"name": LORA_ID, "path": str(lora_file), "recipe": sc.lora}]
        model["lora_mode"] = sc.lora_mode
    deployment: dict[str, Any] = {
        "name": "QwenImageEditModel",
        "num_replicas": sc.replicas,
        "max_ongoing_requests": 1,
        "max_queued_requests": 16,
        "ray_actor_options": {"num_cpus": 4 if sc.gpus else 1, "num_gpus": sc.gpus},
    }
    if sc.memory_cap_gib:
        options = deployment["ray_actor_options"]
        options["runtime_env"] = {"env_vars": {"QWEN_CUDA_MEMORY_CAP_GIB": str(sc.memory_cap_gib)}}
    if sc.ranks > 1:
        # One bundle per rank from the builder (model.parallel); the replica takes bundle 0.
        model["parallel"] = {
            "gpus": sc.ranks,
            "cfg": sc.cfg if sc.cfg == "auto" else int(sc.cfg),
            "ulysses": sc.ulysses if sc.ulysses == "auto" else int(sc.ulysses),
            "cpus_per_rank": 4 if sc.gpus else 0.5,
        }
        if not sc.gpus:
            model["device_map"] = "cpu"
        del deployment["ray_actor_options"]
    return {
        "name": APP,
        "route_prefix": "/",
        "import_path": "serve_app.app:build_app",
        "args": {
            "model": model,
            # The warm-up edit at the benchmark's size (auto_size_pixels sets its side).
            "generation": {
                "default_steps": steps,
                "max_steps": max(100, steps),
                "auto_size_pixels": SIZE * SIZE,
            },
        },
        "deployments": [deployment, {"name": "OpenAIIngress", "num_replicas": 1}],
    }


def deploy(sc: Scenario, url: str, *, steps: int, timeout_s: float) -> dict[str, Any]:
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [app_config(sc, steps=steps)]})
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    ready: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            details = [status.message] + [
                f"{name}: {d.message}" for name, d in status.deployments.items() if d.message
            ]
            raise RuntimeError("deploy failed: " + "\n".join(details)[-4000:])
        if ready is None:
            try:
                resp = httpx.get(f"{url}/ready", timeout=10)
                if resp.status_code == 200:
                    ready = dict(resp.json())
            except httpx.HTTPError:
                pass
        # /ready answers once one replica does; wait for all of them (RUNNING = all healthy).
        if ready is not None and status is not None and status.status == "RUNNING":
            return ready
        time.sleep(1)
    raise TimeoutError(f"app not ready in {timeout_s:.0f} s")


@dataclass
class Edit:
    rid: str
    seconds: float  # HTTP end to end, as the client saw it
    image: bytes  # the output file
    server_timing_ms: dict[str, float]  # the Server-Timing header's stages


def post_edit(
    client: Any, url: str, png: bytes, data: dict[str, str], *, tag: str
) -> tuple[Any, str, float]:
    """POST one multipart edit with `png` as the image; (response, request id, client seconds).
    `client` is httpx or an httpx.Client. Raises unless the answer is 200."""
    rid = f"{tag}-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    resp = client.post(
        f"{url}/v1/images/edits",
        data=data,
        files=[("image", ("input.png", png, "image/png"))],
        headers={"x-request-id": rid},
        timeout=1800,
    )
    seconds = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return resp, rid, seconds


_THREAD = threading.local()


def http_client() -> Any:
    """This thread's httpx client, made once (an SSL context and a connection pool: making them
    for each request is client time no server spends, which results before it counted;
    docs/gpu.md), kept alive as the openai SDK keeps its own."""
    client = getattr(_THREAD, "client", None)
    if client is None:
        import httpx

        client = _THREAD.client = httpx.Client(timeout=1800)
    return client


def edit_http(
    url: str, png: bytes, *, steps: int | None, seed: int = 0, model: str = "qwen-image-edit"
) -> Edit:
    """One edit over HTTP, with this thread's client. `steps` None: a LoRA id's request as a user
    sends it, steps and CFG left to its recipe; otherwise `steps` steps with true CFG."""
    data = {"model": model, "prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "seed": str(seed)}
    if steps is not None:
        data.update(negative_prompt=" ", true_cfg_scale="4", num_inference_steps=str(steps))
    resp, rid, elapsed = post_edit(http_client(), url, png, data, tag="bench")
    body = resp.json()
    image = base64.b64decode(body["data"][0]["b64_json"])
    if body["size"] != f"{SIZE}x{SIZE}" or len(image) < 1000:
        raise RuntimeError(f"unexpected answer: size {body['size']}, {len(image)} bytes")
    return Edit(rid, elapsed, image, parse_server_timing(resp.headers.get("server-timing", "")))


def timed_edit(sc: Scenario, url: str, png: bytes, *, steps: int, seed: int) -> Edit:
    """One timed edit of the scenario: its model id, at its steps (a LoRA's from its recipe)."""
    if sc.lora:
        return edit_http(url, png, steps=None, seed=seed, model=sc.model_id)
    return edit_http(url, png, steps=steps, seed=seed)


def relative_error(image: bytes, reference: bytes) -> float:
    """||a - b|| / ||b|| over the decoded RGB pixels (0..1)."""
    import numpy as np
    from PIL import Image

    a, b = (
        np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), np.float64) / 255
        for x in (image, reference)
    )
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# The pipeline's stages in Server-Timing (the replica's EditOutput.timings_s): the bare pipeline
# call and its parts.
PIPELINE_STAGES = ("pipeline", "text_encoder", "vae_encode", "vae_decode", "denoise")


def pipeline_timings(server_timing_ms: dict[str, float]) -> dict[str, float] | None:
    """Seconds per pipeline stage from an edit's Server-Timing stages (ms); None without them."""
    if "pipeline" not in server_timing_ms:
        return None
    ms = server_timing_ms
    return {k: round(ms[k] / 1000, 4) for k in PIPELINE_STAGES if k in ms}


def replica_device_maps(replicas: int, *, tries: int = 40) -> list[dict[str, str]]:
    """Each replica's ModelInfo.device_map (with the CUDA_VISIBLE_DEVICES Ray gave it), asking
    the deployment until `replicas` different ones answered."""
    from ray import serve

    async def ask() -> list[dict[str, str]]:
        # Awaited in an event loop: Ray Serve's throughput-optimized mode runs a handle's router
        # on the caller's loop and refuses blocking `.result()` calls outside one.
        handle = serve.get_deployment_handle("QwenImageEditModel", app_name=APP)
        seen: dict[str, dict[str, str]] = {}
        for _ in range(tries):
            device_map = dict((await handle.info.remote()).device_map)
            seen[json.dumps(device_map, sort_keys=True)] = device_map
            if len(seen) >= replicas:
                break
        return list(seen.values())

    return asyncio.run(ask())


def replica_allocator_peaks() -> list[float] | None:
    """One replica's allocator peak per GPU (torch.cuda.max_memory_allocated), GiB; None if
    it cannot say."""
    from ray import serve

    async def ask() -> list[tuple[str, int, int]]:
        handle = serve.get_deployment_handle("QwenImageEditModel", app_name=APP)
        return list(await handle.memory.remote())

    try:
        return [round(peak / GiB, 2) for _, _, peak in asyncio.run(ask())]
    except Exception as exc:  # a figure we cannot read is no reason to lose the run
        print(f"allocator peaks: {exc}", flush=True)
        return None


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run_scenario(
    sc: Scenario, *, url: str, png: bytes, steps: int, runs: int, deadline: float,
    flops_per_forward: float, text_tokens: dict[str, int], sampler: GpuSampler,
    outputs: dict[str, bytes],
) -> dict[str, Any]:  # fmt: skip
    from ray import serve

    result: dict[str, Any] = {
        "name": sc.name,
        "gpus_per_replica": sc.ranks if sc.ranks > 1 else sc.gpus,
        "replicas": sc.replicas,
        "ranks_per_replica": sc.ranks,
        "mode": sc.mode,
        "compile": sc.compile,
        "quantization": "fp8" if sc.fp8 else "none",
        "attention_backend": sc.backend,
        "weights": "synthetic-shrunk" if OVERRIDES else "synthetic-full",
        "variant": sc.variant,
        "size": f"{SIZE}x{SIZE}",
        "reference_images": 1,
        "steps": steps,
        "true_cfg": sc.true_cfg,
        "image_tokens": image_tokens(SIZE, SIZE, references=1),
        "text_tokens": text_tokens,
        "gflop_per_forward": round(flops_per_forward / 1e9, 1),
    }
    if sc.lora:
        from serve_app.common.recipes import RECIPES

        result.update(
            lora=sc.lora,
            lora_mode=sc.lora_mode,
            lora_rank=sc.lora_rank,
            scheduler={"recipe": sc.lora, **RECIPES[sc.lora].scheduler},
        )
    sampler.reset()
    t0 = time.perf_counter()
    try:
        budget = min(DEPLOY_TIMEOUT_S, deadline - time.monotonic())
        ready = deploy(sc, url, steps=steps, timeout_s=max(60.0, budget))
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        result["ready"] = ready
        if ready.get("parallel"):
            result["parallel"] = {k: ready["parallel"][k] for k in ("gpus", "cfg", "ulysses")}
        print(f"[{sc.name}] ready in {result['startup_s']} s: {ready}", flush=True)
        result["replica_device_maps"] = replica_device_maps(sc.replicas)
        print(f"[{sc.name}] replicas: {result['replica_device_maps']}", flush=True)
        # One short edit per replica (HTTP path, the benchmark prompt's text length).
        # A LoRA scenario's id runs its recipe (its scheduler and steps); a fused one is the only
        # id served.
        with ThreadPoolExecutor(sc.replicas) as pool:
            if not sc.lora or sc.lora_mode == "hotswap":
                list(pool.map(lambda i: edit_http(url, png, steps=2, seed=i), range(sc.replicas)))
            if sc.lora:
                list(pool.map(lambda i: timed_edit(sc, url, png, steps=steps, seed=i),
                              range(sc.replicas)))  # fmt: skip
        latencies, bare = [], []
        server_timings: list[dict[str, float]] = []
        for i in range(runs):
            if time.monotonic() > deadline:
                result["note"] = f"stopped after {i} timed runs: time limit"
                break
            edit = timed_edit(sc, url, png, steps=steps, seed=100 + i)
            seconds = edit.seconds
            server_timings.append(edit.server_timing_ms)
            if i == 0:
                outputs[sc.name] = edit.image
                if IMAGES_DIR is not None:  # to compare outputs of separate runs later
                    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
                    (IMAGES_DIR / f"{sc.name}-seed100.png").write_bytes(edit.image)
                if sc.ref and sc.ref in outputs:
                    result["ref_scenario"] = sc.ref
                    result["rel_err_vs_ref"] = round(relative_error(edit.image, outputs[sc.ref]), 5)
            timings = pipeline_timings(edit.server_timing_ms)
            latencies.append(seconds)
            if timings:
                bare.append(timings)
            print(
                f"[{sc.name}] run {i} ({edit.rid}): http {seconds:.2f} s, pipeline {timings}",
                flush=True,
            )
        result["latency_s_all"] = [round(x, 3) for x in latencies]
        # Where the serving overhead goes (ms, medians): the ingress' and replica's stages.
        keys = (
            [k for k in server_timings[0] if all(k in t for t in server_timings)]
            if server_timings
            else []
        )
        result["server_timing_ms_median"] = {
            k: round(statistics.median(t[k] for t in server_timings), 1) for k in keys
        }
        result["latency_s_median"] = median(latencies)
        stage = {k: median([t[k] for t in bare if k in t]) for k in (bare[0] if bare else {})}
        result["bare_pipeline_s_all"] = [round(t["pipeline"], 3) for t in bare]
        result["bare_pipeline_s_median"] = stage.get("pipeline")
        result["text_encoder_s"] = stage.get("text_encoder")
        result["vae_encode_s"] = stage.get("vae_encode")
        result["vae_decode_s"] = stage.get("vae_decode")
        result["denoise_s"] = stage.get("denoise")
        total_ms = result["server_timing_ms_median"].get("total")
        if result["latency_s_median"] and total_ms:
            # The client, the network and Serve's HTTP proxy: all but the ingress' own time.
            result["outside_ingress_ms"] = round(1000 * result["latency_s_median"] - total_ms, 1)
        if result["latency_s_median"] and result["bare_pipeline_s_median"]:
            lat, base = result["latency_s_median"], result["bare_pipeline_s_median"]
            result["overhead_pct"] = round(100 * (lat - base) / base, 2)
            result["overhead_s"] = round(lat - base, 3)
        if stage.get("denoise"):
            per_step = stage["denoise"] / steps
            forwards = 2 if sc.true_cfg else 1  # per step
            result["ms_per_cfg_step" if sc.true_cfg else "ms_per_step"] = round(1000 * per_step, 1)
            result["ms_per_forward"] = round(1000 * per_step / forwards, 1)
            result["tflops"] = round(forwards * flops_per_forward / per_step / 1e12, 1)
            if sc.ranks > 1:
                result["tflops_note"] = "several GPUs: aggregate; ms_per_forward is effective"
        result["peak_gib_per_gpu"] = sampler.peaks_gib()
        result["peak_memory_source"] = "nvidia-smi memory.used (weights+activations+cache+context)"
        if sc.memory_cap_gib:
            result["memory_cap_gib"] = sc.memory_cap_gib
            result["text_encoder"] = sc.text_encoder
            result["vae_tiling"] = sc.vae_tiling
        result["allocator_peak_gib_per_gpu"] = replica_allocator_peaks()
        if sc.lora and sc.lora_mode == "hotswap" and time.monotonic() < deadline:
            # A base edit, then the LoRA id: the switch (weights rewritten + scheduler) in one edit.
            edit_http(url, png, steps=2, seed=7)
            after = timed_edit(sc, url, png, steps=steps, seed=8)
            result["latency_after_switch_s"] = round(after.seconds, 3)
        if sc.clients and sc.rounds:
            result.update(throughput(sc, url, png, steps=steps, deadline=deadline))
            result["peak_gib_per_gpu"] = sampler.peaks_gib()
        if sc.base and sc.base in BASE_LATENCY and result["latency_s_median"]:
            one = BASE_LATENCY[sc.base]
            result["base_scenario"] = sc.base
            result["speedup_vs_base"] = round(one / result["latency_s_median"], 3)
            result["scaling_efficiency"] = round(
                one / (result["latency_s_median"] * max(sc.ranks, sc.gpus)), 3
            )
        if result["latency_s_median"]:
            BASE_LATENCY[sc.name] = result["latency_s_median"]
        if sc.restart and time.monotonic() < deadline:
            # The same app again: a restarted replica finds the compile cache on the node.
            serve.delete(APP)
            t1 = time.perf_counter()
            deploy(sc, url, steps=steps, timeout_s=max(60.0, deadline - time.monotonic()))
            result["startup_cold_s"] = result["startup_s"]
            result["startup_warm_s"] = round(time.perf_counter() - t1, 1)
            print(f"[{sc.name}] ready again (warm) in {result['startup_warm_s']} s", flush=True)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        print(f"[{sc.name}] FAILED: {result['error']}", flush=True)
    finally:
        try:
            serve.delete(APP)
        except Exception as exc:
            print(f"[{sc.name}] delete failed: {exc}", flush=True)
    return result


def throughput(
    sc: Scenario, url: str, png: bytes, *, steps: int, deadline: float
) -> dict[str, Any]:
    lat: list[float] = []
    lock = threading.Lock()
    done = 0

    def client(index: int) -> None:
        nonlocal done
        for r in range(sc.rounds):
            if time.monotonic() > deadline:
                return
            seconds = timed_edit(sc, url, png, steps=steps, seed=1000 + 10 * index + r).seconds
            with lock:
                lat.append(seconds)
                done += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sc.clients) as pool:
        list(pool.map(client, range(sc.clients)))
    wall = time.perf_counter() - t0
    print(f"[{sc.name}] throughput: {done} edits in {wall:.1f} s", flush=True)
    return {
        "throughput_clients": sc.clients,
        "throughput_rounds": sc.rounds,
        "throughput_edits": done,
        "throughput_wall_s": round(wall, 2),
        "throughput_img_per_min": round(60 * done / wall, 2) if done else None,
        "throughput_latency_s_median": median(lat),
    }


def text_token_counts(variant: str) -> dict[str, int]:
    """What the replicas' tokenizer (the embedded tiny model's, see runner) makes of the prompts;
    building it here first also saves the replicas the build."""
    from serve_app.pipeline.random_weights.synthetic import (
        load_tokenizer_and_processor,
        variant_dir,
    )
    from serve_app.pipeline.random_weights.tiny import ensure_tiny_model

    config = json.loads((variant_dir(variant) / "text_encoder" / "config.json").read_text())
    _, processor = load_tokenizer_and_processor(
        ensure_tiny_model(), vision_config=config["vision_config"]
    )
    return {"cond": prompt_tokens(processor, PROMPT), "uncond": prompt_tokens(processor, " ")}


def main(argv: list[str] | None = None) -> int:
    global SIZE, OVERRIDES, IMAGES_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", required=True, type=Scenario.parse)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--time-limit-s", type=float, default=540.0)
    parser.add_argument("--size", type=int, default=SIZE, help="output and reference side")
    parser.add_argument(
        "--synthetic-overrides", type=Path, default=None, help="JSON file (CPU smoke tests only)"
    )
    parser.add_argument("--images-dir", type=Path, default=None, help="save first outputs here")
    args = parser.parse_args(argv)
    SIZE = args.size
    IMAGES_DIR = args.images_dir
    if args.synthetic_overrides:
        OVERRIDES = json.loads(args.synthetic_overrides.read_text())
    deadline = time.monotonic() + args.time_limit_s

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    png = reference_png()
    sampler = GpuSampler().start()
    port = free_port()
    # The cluster's processes start as the launcher's and the image's do (not this client).
    cluster_env = cluster_runtime_env()
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env=cluster_env)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "versions": versions(),
        "serve_ingress": serve_ingress(),
        "cluster_env": cluster_env["env_vars"],
        "date": time.strftime("%Y-%m-%d"),
    }
    summary = []
    outputs: dict[str, bytes] = {}  # first timed output of each scenario (for `ref=`)
    try:
        for sc in args.scenario:
            from serve_app.pipeline.random_weights.synthetic import variant_dir

            tokens = text_token_counts(sc.variant)
            config_path = variant_dir(sc.variant) / "transformer" / "config.json"
            config = json.loads(config_path.read_text())
            config.update((OVERRIDES or {}).get("transformer", {}))
            img = image_tokens(SIZE, SIZE, references=1)
            # A forward's FLOPs: the mean of the two CFG branches' (a LoRA id runs the prompt's
            # alone; its adapter's own FLOPs are not counted).
            branches = [tokens["cond"]] if sc.lora else list(tokens.values())
            flops = statistics.mean(
                transformer_flops(config, image_tokens=img, text_tokens=t) for t in branches
            )
            steps = sc.steps or args.steps
            if sc.lora:
                from serve_app.common.recipes import RECIPES

                steps = RECIPES[sc.lora].steps  # what the LoRA id runs when a request says nothing
            result = run_scenario(
                sc, url=url, png=png, steps=steps, runs=sc.runs or args.runs, deadline=deadline,
                flops_per_forward=flops, text_tokens=tokens, sampler=sampler, outputs=outputs,
            )  # fmt: skip
            names = sampler.names
            result["gpu"] = names.get(0, "unknown") if names else "unknown"
            result.update(info)
            path = args.out_dir / f"{sc.name}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            summary.append(result)
            print(json.dumps(result), flush=True)
    finally:
        sampler.stop()
        serve.shutdown()
        ray.shutdown()
    print(
        "\nscenario         mode                                latency  bare     ovh%   ms/fwd"
        "  TFLOP/s  img/min  peak GiB/GPU"
    )
    for r in summary:
        print(
            f"{r['name']:16s} {r['mode']:35s} {r.get('latency_s_median')!s:8s} "
            f"{r.get('bare_pipeline_s_median')!s:8s} {r.get('overhead_pct')!s:6s} "
            f"{r.get('ms_per_forward')!s:7s} {r.get('tflops')!s:8s} "
            f"{r.get('throughput_img_per_min')!s:8s} {r.get('peak_gib_per_gpu')}"
            + (f"  ERROR {r['error'][:200]}" if "error" in r else "")
        )
    return 0 if all("error" not in r for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
