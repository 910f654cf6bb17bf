"""Application configuration: the `args:` of serve_config.yaml, validated once in the builder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.common.recipes import RECIPES, RecipeName

# Environment overrides, for operators who keep one serve_config.yaml for many machines.
ENV_MODEL_DIR = "QWEN_MODEL_DIR"
ENV_DEVICE_MAP = "DEVICE_MAP"

DEFAULT_MODEL_NAME = "qwen-image-edit"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Strict):
    """One LoRA served as its own model id, e.g. a Lightning 4-step LoRA (docs/api.md#loras)."""

    # The model id clients send as `model`; listed in /v1/models.
    name: str = Field(min_length=1)
    # A local .safetensors file, a folder holding `weight_name`, or a Hugging Face model id
    # (org/name) whose `weight_name` file the replica fetches into the Hugging Face cache.
    path: str
    weight_name: str | None = None
    # A Hub branch, tag or commit to pin a Hugging Face id to; None: the default branch.
    revision: str | None = None
    scale: float = 1.0
    # A published sampling recipe (common/recipes.py): its scheduler config, steps and CFG.
    recipe: RecipeName | None = None
    # Scheduler config fields, over the recipe's (or, without a recipe, over the model's own).
    scheduler: dict[str, Any] | None = None
    # Steps and CFG when a request leaves them out; None: the recipe's, else the generation's.
    default_steps: int | None = Field(default=None, ge=1)
    default_true_cfg_scale: float | None = Field(default=None, ge=0.0)

    @property
    def steps(self) -> int | None:
        if self.default_steps is not None:
            return self.default_steps
        return RECIPES[self.recipe].steps if self.recipe else None

    @property
    def true_cfg_scale(self) -> float | None:
        if self.default_true_cfg_scale is not None:
            return self.default_true_cfg_scale
        return RECIPES[self.recipe].true_cfg_scale if self.recipe else None

    @property
    def scheduler_config(self) -> dict[str, Any] | None:
        """The scheduler this id runs with: the recipe's config with `scheduler` over it; without
        a recipe, just the overrides (applied to the model's own scheduler); None: unchanged."""
        if self.recipe:
            return {**RECIPES[self.recipe].scheduler, **(self.scheduler or {})}
        return dict(self.scheduler) if self.scheduler else None


class ParallelConfig(_Strict):
    """One replica over several GPUs: one process (rank) per GPU, all ranks on every edit.

    The builder turns `gpus` into the model deployment's placement group (one bundle per rank,
    `placement_strategy`); rank 0 is the Serve replica, the others are Ray actors in the bundles.
    docs/gpu.md has the shapes and their measured latency."""

    # Ranks (GPUs) per replica. 1: today's single process (with device_map over the GPUs that
    # `ray_actor_options.num_gpus` gives it, e.g. a transformer split over small cards).
    gpus: int = Field(default=1, ge=1, le=64)
    # CFG degree: 2 runs the conditional and unconditional passes on two halves of the ranks.
    cfg: Literal["auto", 1, 2] = "auto"
    # Ulysses (sequence) degree inside each CFG half; cfg x ulysses = gpus. auto: gpus / cfg.
    ulysses: int | Literal["auto"] = "auto"
    # Where the ranks' bundles go: STRICT_PACK (one node, NVLink), PACK, SPREAD or STRICT_SPREAD
    # (across nodes: a replica larger than one machine).
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    # CPUs reserved per rank (bundle); rank 0's is also the replica's num_cpus.
    cpus_per_rank: float = Field(default=4.0, gt=0)
    # A collective (NCCL/gloo) or a rank that waits longer than this fails the replica, which
    # Serve then replaces; it bounds how long a dead or wedged rank can hold a request.
    timeout_s: float = Field(default=300.0, gt=0)


# Sources whose weights are random: their images are noise (a demo of the API, or a benchmark).
RANDOM_WEIGHT_SOURCES = frozenset({"tiny", "synthetic"})


def has_random_weights(source: str) -> bool:
    """Whether a model of `source` makes noise: what clients and the playground warn about."""
    return source in RANDOM_WEIGHT_SOURCES


class ModelConfig(_Strict):
    """Which pipeline to load and where to put it."""

    # local: a diffusers-format folder (Qwen-Image-Edit, -2509, -2511).
    # tiny: the embedded random-weight model, built on first use (CPU demo and tests).
    # synthetic: real architecture, random weights made on the GPUs (benchmarks, GPU tests).
    source: Literal["local", "tiny", "synthetic"] = "local"
    # local: a diffusers folder, or a Hugging Face model id (e.g. Qwen/Qwen-Image-Edit-2511)
    # that the model replica downloads into the Hugging Face cache (HF_HOME) at start.
    path: str | None = None
    # A Hub branch, tag or commit to pin the model id to; None: the default branch.
    revision: str | None = None
    served_name: str = DEFAULT_MODEL_NAME
    aliases: list[str] = Field(default_factory=list)
    # auto: "balanced" with 2+ GPUs, "cuda" with one, "cpu" with none.
    device_map: Literal["auto", "balanced", "cuda", "cpu"] = "auto"
    # auto: bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Upper bound on reference images for the Plus pipelines; the v1 Edit pipeline takes one.
    max_input_images: int = Field(default=3, ge=1, le=8)
    synthetic_variant: Literal["2509", "2511"] = "2509"
    # Per-GPU memory cap in GiB (index -> GiB), passed to placement.
    max_memory_gib: dict[int, float] | None = None
    allow_cpu_offload: bool = False
    # Placement keeps activation headroom for edits up to this many output pixels (None: 2048x2048,
    # limits.max_output_pixels' default) with this many references (None: max_input_images).
    headroom_max_pixels: int | None = Field(default=None, ge=64 * 64)
    headroom_ref_images: int | None = Field(default=None, ge=0, le=8)
    # Speed switches (docs/gpu.md has the measured effect of each; all off on CPU).
    # torch.compile the transformer's repeated blocks (fullgraph); compiles at replica start.
    compile: bool = False
    # torch.compile's `dynamic`: True compiles once for every size and prompt length; None lets
    # torch recompile (once per device) the first time an input size changes.
    compile_dynamic: bool | None = None
    # Inductor's C++ wrapper for the compiled blocks (torch._inductor.config.cpp_wrapper, as
    # TORCHINDUCTOR_CPP_WRAPPER=1): kernels are launched from C++ instead of Python, which
    # matters only where host time limits a step. Needs a C++ compiler; compiling takes longer
    # (both measured in docs/gpu.md's speed-switch table).
    compile_cpp_wrapper: bool = False
    # torch.compile the text encoder's repeated layers too (the language model's decoder layers
    # and the vision tower's blocks, dynamic shapes: prompt lengths vary), for few-step
    # (distilled) ids, where the text encoder is a large part of an edit. Measured without a
    # gain on H100 (docs/gpu.md, Distilled LoRAs), so off. Compiles at start.
    compile_text_encoder: bool = False
    # diffusers attention dispatcher backend, e.g. "native", "_native_cudnn", "_native_flash",
    # "_native_efficient", "flash" (needs flash-attn), "_flash_3" (FA3). None: diffusers' default.
    attention_backend: str | None = None
    # Removed: CFG on two GPUs is `parallel: {gpus: 2}` (one process per GPU). Kept so that an
    # old config that sets it gets that message instead of "extra field".
    cfg_parallel: bool = False
    # fp8: the transformer blocks' linear layers get float8 weights and per-token float8
    # activations (torchao; needs compute capability 8.9+: Ada, Hopper, Blackwell). Faster on
    # FP8 tensor cores and half the transformer's weight memory, at a small output difference
    # (docs/gpu.md has both measured). none: bf16/fp16 as loaded.
    quantization: Literal["none", "fp8"] = "none"
    # With fp8, the blocks' 120 modulation linears (img_mod / txt_mod, used once per edit to
    # make the modulation tables) get int8 weights too (weight-only, one scale per row).
    # The text encoder: resident (as loaded, on its GPU), or for cards that cannot hold it
    # beside the transformer (docs/gpu.md#one-card): int8 (its linear layers get int8 weights,
    # weight-only, any GPU) or offload (its weights stay on the CPU and are streamed to the GPU
    # layer by layer for each encode, accelerate's cpu_offload: a cost per edit, not memory).
    text_encoder: Literal["resident", "int8", "offload"] = "resident"
    # With fp8: each 8-bit layer is quantized as it reaches the GPU (block linears fp8, the 120
    # modulation linears int8), so the bf16 weights never have to fit the card at once (the
    # one-card configs set it; docs/gpu.md#one-card). A fused LoRA is added to each linear in
    # bf16 as it arrives, before it is quantized; hotswap is refused (it rewrites bf16 base
    # weights loaded first). Off: fp8 quantizes the loaded bf16 block linears after loading,
    # modulation stays bf16 (the path measured on 80 GB cards).
    quantize_at_load: bool = False
    # Encode and decode with the VAE in tiles (diffusers' enable_tiling): a small, fixed VAE
    # peak instead of one that grows with the image, for small cards.
    vae_tiling: bool = False
    # Run one small edit at replica start (before reporting ready). None: only when compile is on.
    warmup: bool | None = None
    # synthetic source only: config overrides per component (tests shrink the model with it).
    # (Its tokenizer: `path`/tokenizer if that exists, else the embedded tiny model's.)
    synthetic_overrides: dict[str, dict[str, Any]] | None = None
    # Which embedded tiny model `source: tiny` builds (tests and demos of each variant).
    tiny_variant: Literal["edit", "2509", "2511"] = "2509"
    # Loaded once at start; each is chosen per request by its name as `model`.
    loras: list[LoraConfig] = Field(default_factory=list)
    # How LoRAs are held (docs/gpu.md#distilled-loras): hotswap keeps the base model and every
    # LoRA, switched per request by rewriting the adapted linears' weights (base + the LoRA's
    # product, no recompile; each id then runs at the base model's cost per forward); fused folds
    # the one LoRA into the weights at load (then fp8, then compile): only the LoRA's id is served.
    lora_mode: Literal["hotswap", "fused"] = "hotswap"
    # Several GPUs per replica as ranks (CFG x Ulysses sequence parallelism).
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _needs_path(self) -> ModelConfig:
        if self.source == "local" and not self.path:
            raise ValueError(f"model.path is required for source 'local' (or set {ENV_MODEL_DIR})")
        return self

    @model_validator(mode="after")
    def _lora_names_unique(self) -> ModelConfig:
        names = [lora.name for lora in self.loras]
        clashes = {n for n in names if names.count(n) > 1 or n in self.served_names}
        if clashes:
            raise ValueError(f"model.loras names must be unique model ids: {sorted(clashes)}")
        return self

    @model_validator(mode="after")
    def _fused_one(self) -> ModelConfig:
        if self.lora_mode == "fused" and len(self.loras) != 1:
            raise ValueError(
                f"model.lora_mode fused folds exactly one LoRA into the weights; {len(self.loras)}"
                " configured (use lora_mode: hotswap to serve several, or the base model too)"
            )
        return self

    @model_validator(mode="after")
    def _no_hotswap_at_load(self) -> ModelConfig:
        if self.loras and self.lora_mode == "hotswap" and self.quantize_at_load:
            raise ValueError(
                "model.lora_mode hotswap does not combine with model.quantize_at_load: switching"
                " rewrites the adapted linears from their bf16 base weights, which a transformer"
                " quantized as it loads never holds. Use lora_mode: fused (the one LoRA fused into"
                " each linear as it loads, then quantized; its id alone is served), or"
                " quantize_at_load: false on a card that holds the bf16 transformer (80 GB)"
            )
        return self

    @model_validator(mode="after")
    def _quantization_alone(self) -> ModelConfig:
        if self.quantization != "none" and self.device_map == "cpu":
            raise ValueError("model.quantization fp8 needs GPUs (device_map is cpu)")
        if self.text_encoder != "resident" and self.device_map == "cpu":
            raise ValueError(
                f"model.text_encoder {self.text_encoder} needs GPUs (device_map is cpu)"
            )
        if self.quantization != "none" and not self.compile:
            # Unfused, the per-token activation quantization costs more than FP8 matmuls save.
            raise ValueError(
                "model.quantization fp8 needs model.compile: true (eager FP8 measured 1.6x"
                " slower than bf16 on H100)"
            )
        return self

    @model_validator(mode="after")
    def _parallel_shape(self) -> ModelConfig:
        if self.cfg_parallel:
            raise ValueError(
                "model.cfg_parallel was removed: for CFG on two GPUs set model.parallel:"
                " {gpus: 2} (one process per GPU, faster and no C++ compiler needed;"
                " docs/gpu.md)"
            )
        return self

    @property
    def served_names(self) -> list[str]:
        return [self.served_name, *[a for a in self.aliases if a != self.served_name]]

    @property
    def model_ids(self) -> list[str]:
        """Every id a request may name, the default first: the base model's names, then the
        LoRAs; with a fused LoRA only its name (the base model's weights are gone)."""
        if self.lora_mode == "fused":
            return [lora.name for lora in self.loras]
        return [*self.served_names, *(lora.name for lora in self.loras)]

    def lora(self, model_id: str) -> LoraConfig | None:
        return next((lora for lora in self.loras if lora.name == model_id), None)


class GenerationConfig(_Strict):
    """Defaults for the documented request extensions."""

    default_steps: int = Field(default=50, ge=1)
    max_steps: int = Field(default=100, ge=1)
    true_cfg_scale: float = Field(default=4.0, ge=0.0)
    # " " turns true CFG on, as the model cards use it.
    negative_prompt: str = " "
    # size=auto: the first input's aspect ratio at about this many pixels.
    auto_size_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    # Inpainting (`mask`) strength: 1.0 repaints the transparent area from pure noise.
    mask_strength: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _steps_in_range(self) -> GenerationConfig:
        if self.default_steps > self.max_steps:
            raise ValueError("generation.default_steps must be <= generation.max_steps")
        return self


class LimitsConfig(_Strict):
    """Request limits; each rejection names the offending field."""

    max_n: int = Field(default=4, ge=1, le=10)
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    min_output_side: int = Field(default=256, ge=16)
    max_output_side: int = Field(default=2048, ge=16)
    max_output_pixels: int = Field(default=2048 * 2048, ge=16 * 16)
    # prompt and negative_prompt, each: characters (a cheap bound checked first), then tokens of
    # the model's own tokenizer, counted in the ingress. The Qwen-Image pipelines take at most
    # 1024 text tokens (their max_sequence_length); the edit pipelines do not cut a longer prompt
    # but fail in the transformer's RoPE table (4096 positions for text, image tokens and the
    # reference images' largest side together), so 1024 is also the ceiling.
    max_prompt_chars: int = Field(default=4000, ge=1)
    max_prompt_tokens: int = Field(default=1024, ge=1, le=1024)
    # Input images: long side / short side. The pipelines resize each reference to a fixed area
    # in multiples of 32 px, and Qwen2.5-VL's image processor refuses an aspect ratio above 200
    # after that rounding, which a 1:164 image reaches in Qwen-Image-Edit's 1 MP resize.
    max_input_aspect_ratio: float = Field(default=100.0, ge=1.0, le=150.0)
    # All request headers together (names and values): above it the ingress answers 431 before
    # reading the body. Serve's HTTP proxy reads the headers first, whatever their size
    # (docs/running.md says what to put in front of it).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)

    @model_validator(mode="after")
    def _sides(self) -> LimitsConfig:
        if self.min_output_side > self.max_output_side:
            raise ValueError("limits.min_output_side must be <= limits.max_output_side")
        return self


REDIS_SCHEMES = ("redis", "rediss")


def is_redis_url(url: str) -> bool:
    """Whether a storage URL names a Redis server (redis://, rediss:// with TLS)."""
    return "://" in url and url.split("://", 1)[0].lower() in REDIS_SCHEMES


class StorageConfig(_Strict):
    """Where `response_format=url` results live: shared by every ingress replica."""

    # A local folder (one machine: the default), a Redis server (redis://host:6379/0,
    # rediss:// for TLS; what a cluster's replicas on several nodes share), or any fsspec URL
    # (s3://bucket/prefix, gcs://..., memory:// for tests).
    url: str = "~/.cache/qwen-image-edit-serve/images"
    # OpenAI's URLs expire after an hour.
    ttl_s: float = Field(default=3600.0, gt=0)
    # The oldest images are evicted to stay under this.
    max_total_bytes: int = Field(default=1024**3, ge=1024)
    # Redis only: every key this server writes starts with it, so one Redis (e.g. the one
    # KubeRay's GCS fault tolerance uses) can hold several deployments' images apart.
    key_prefix: str = Field(default="qwen-image-edit-serve", min_length=1, pattern=r"^[^{}\s]+$")
    # Redis only: the environment variable of the ingress process holding the server's password
    # (e.g. from a Kubernetes Secret); the password itself never enters the config (or its logs).
    password_env: str | None = None
    # Prefix of the returned URLs, e.g. https://images.example.com. Unset: the request's own
    # address, if its Host is in http.allowed_hosts (else response_format=url is refused).
    public_base_url: str | None = None


class AuthConfig(_Strict):
    """Where API keys come from; the keys themselves never enter the config (or its logs)."""

    # Comma-separated keys in this environment variable of the ingress process.
    api_keys_env: str = "QWEN_API_KEYS"
    # A mounted file (e.g. a Kubernetes Secret) with one key per line; '#' starts a comment.
    api_keys_file: str | None = None
    # Routes answered without a key (probes).
    open_paths: list[str] = Field(default_factory=lambda: ["/health", "/ready"])


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


class HttpConfig(_Strict):
    """Which request headers the ingress trusts: Host (for url links and same-origin checks),
    X-Forwarded-Host/Proto, and a browser's Origin. docs/running.md shows the settings for a
    server reached by name or behind a proxy."""

    # Host names (no port) this server may be addressed by: response_format=url links are built
    # only from these (unless storage.public_base_url is set), and a browser page is
    # same-origin only on them. ".example.com" matches its subdomains; "*" any Host (then
    # any client chooses the links' host). Default: loopback, what `make run` serves on.
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    # Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-Host and
    # X-Forwarded-Proto are believed; from any other client those headers are ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Other origins (scheme://host[:port]) whose web pages may POST edits from a browser;
    # "*" lets any page do so. Requests without an Origin (curl, SDKs) are never affected.
    allowed_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _proxies_parse(self) -> HttpConfig:
        import ipaddress

        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"http.trusted_proxies: {proxy!r} is not an IP address or network"
                ) from None
        return self


class AppConfig(_Strict):
    model: ModelConfig
    generation: GenerationConfig = GenerationConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()
    auth: AuthConfig = AuthConfig()
    http: HttpConfig = HttpConfig()
    # Per-request deadline from its arrival, upload and queueing included: past it denoising
    # stops and the client gets 504 (408 while the body is still arriving). Keep it below
    # http_options.request_timeout_s, past which Serve's proxy answers instead of the app
    # (ingress/proxy_errors.py).
    request_timeout_s: float = Field(default=600.0, gt=0)
    # An upload that sends nothing for this long is answered 408 at once, freeing its slot.
    upload_stall_timeout_s: float = Field(default=30.0, gt=0)
    # The whole body must arrive within this long (or request_timeout_s, if that is shorter):
    # a client trickling a byte now and then is answered 408 too.
    upload_timeout_s: float = Field(default=120.0, gt=0)
    # check_health fails when an edit has made no denoising step for this long.
    wedged_after_s: float = Field(default=600.0, gt=0)
    # How long /ready waits for the model replica to answer.
    ready_timeout_s: float = Field(default=5.0, gt=0)
    # Reported as the `Retry-After` of 429/503 answers.
    retry_after_s: float = Field(default=5.0, ge=0)

    def defaults_for(self, model_id: str) -> tuple[int, float]:
        """(num_inference_steps, true_cfg_scale) when the request leaves them out."""
        return defaults_for(self.model, self.generation, model_id)


def defaults_for(
    model: ModelConfig, generation: GenerationConfig, model_id: str
) -> tuple[int, float]:
    """(num_inference_steps, true_cfg_scale) of `model_id` when a request leaves them out: the
    LoRA's own (or its recipe's), else the generation defaults; steps capped at max_steps."""
    lora = model.lora(model_id)
    steps = lora.steps if lora is not None else None
    cfg = lora.true_cfg_scale if lora is not None else None
    return (
        min(steps if steps is not None else generation.default_steps, generation.max_steps),
        cfg if cfg is not None else generation.true_cfg_scale,
    )


def every_id_runs_true_cfg(model: ModelConfig, generation: GenerationConfig) -> bool:
    """Whether every model id runs true CFG by default (scale > 1; the generation's negative
    prompt is always set), which a CFG split over ranks needs to keep all of them busy."""
    return all(defaults_for(model, generation, model_id)[1] > 1 for model_id in model.model_ids)


def load_config(
    args: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Validate builder args, applying QWEN_MODEL_DIR / DEVICE_MAP overrides."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = dict(args or {})
    model = dict(data.get("model") or {})
    if env.get(ENV_MODEL_DIR):
        model["path"] = env[ENV_MODEL_DIR]
        model["source"] = "local"
    if env.get(ENV_DEVICE_MAP):
        model["device_map"] = env[ENV_DEVICE_MAP]
    data["model"] = model
    return AppConfig.model_validate(data)
