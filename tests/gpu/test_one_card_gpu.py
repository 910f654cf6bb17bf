"""One card smaller than 80 GB, emulated on one H100 / H200: each shipped one-card config's model
(`deploy/configs/{48,32,24}gb-1gpu.yaml`, source switched to the full-size synthetic 2511) loads
and answers the standard edit (1024x1024, one reference, true CFG) and the largest edit its limits
accept, with the process's memory capped to the card (`torch.cuda.set_per_process_memory_fraction`
and `model.max_memory_gib`); the allocator's and `nvidia-smi`'s peaks are printed. Each config
with its commented Lightning entry switched on (a synthetic LoRA in the real file's place) loads
within the same cap, the LoRA fused into each linear as it arrives, and its 4-step CFG-off edit
is timed. And the text encoder's int8 / offload forms against bf16: the prompt-embedding
difference and seconds per encode.

Run one capped test per pytest process (`-k "cap and 24gb"`, `-k "lightning and 32gb"`): memory a
previous config left reserved in the process (1.3 GiB after the 32 GB config on an H100) counts
against the next one's cap, where a real card starts empty; the `capped` fixture refuses to
start over such leftovers. Skipped without CUDA (conftest):
`python -m pytest tests/gpu/test_one_card_gpu.py -v -s -k "cap and 48gb"`.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.common.config import load_config
from tests.deploy.files import ROOT, app, commented_lightning, serve_config_of
from tests.fixtures import TRUE_CFG, make_job, random_image

from .test_gpu import GiB, check_image, free_gpus, load, report

pytestmark = pytest.mark.gpu

# The card each config is for (GiB) and the CUDA context a real card spends outside the allocator.
CARDS = {"48gb-1gpu.yaml": 48, "32gb-1gpu.yaml": 32, "24gb-1gpu.yaml": 24}
CONTEXT_GIB = 0.5
# What a fresh process may hold before a capped test starts (nothing but small scratch).
LEFTOVER_GIB = 0.25


def nvidia_smi_used_gib(index: int = 0) -> float | None:
    """memory.used of GPU `index` (the whole card: context, cache), None where there is no
    nvidia-smi."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={index}"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return float(text.strip().splitlines()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def capped_model(config: str, cap_gib: float) -> Any:
    args = app(serve_config_of(ROOT / "deploy/configs" / config))["args"]
    settings = load_config(args, environ={})
    model = settings.model.model_copy(
        update={
            "source": "synthetic",
            "synthetic_variant": "2511",
            "path": None,
            "max_memory_gib": {0: cap_gib},
            "warmup": False,
        }
    )
    return model, settings.limits


def edit(*, side: int, refs: int, steps: int, seed: int = 0) -> Any:
    return make_job(
        request_id=f"one-card-{side}-{refs}", prompt="make the sky purple",
        images=[random_image(1024, 1024, seed + i) for i in range(refs)],
        num_inference_steps=steps, width=side, height=side, seeds=[seed], **TRUE_CFG,
    )  # fmt: skip


@pytest.fixture
def capped(request: pytest.FixtureRequest) -> Iterator[float]:
    """The process's allocator capped to the card of the test's `config` (less its CUDA
    context); afterwards compiled code and memory are let go and the cap lifted."""
    import torch

    cap_gib = CARDS[request.node.callspec.params["config"]] - CONTEXT_GIB
    free_gpus()
    held = torch.cuda.memory_reserved(0) / GiB
    assert held < LEFTOVER_GIB, (
        f"{held:.2f} GiB still reserved by an earlier test in this process would count against"
        " the cap: run one capped test per process (-k)"
    )
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / total, 0)
    try:
        yield cap_gib
    finally:
        torch._dynamo.reset()  # compiled code holds the blocks: the next config starts empty
        free_gpus()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def print_peaks(config: str, cap_gib: float) -> None:
    import torch

    (_, peak), *_ = report(f"{config} capped at {cap_gib} GiB")
    smi = nvidia_smi_used_gib()
    print(f"[{config}] allocator peak {peak:.2f} GiB, reserved peak "
          f"{torch.cuda.max_memory_reserved(0) / GiB:.2f} GiB, nvidia-smi now "
          f"{'not available' if smi is None else f'{smi:.2f} GiB'}")  # fmt: skip
    assert torch.cuda.max_memory_reserved(0) <= cap_gib * GiB


@pytest.mark.gpus(1)
@pytest.mark.parametrize("config", list(CARDS))
def test_one_card_config_answers_within_its_cap(config: str, capped: float) -> None:
    cap_gib = capped
    runner = None
    try:
        model, limits = capped_model(config, cap_gib)
        runner = load(model)
        assert "strategy: single" in runner.info.placement_table
        assert "bf16+fp8+int8" in runner.info.placement_table
        t0 = time.perf_counter()
        out = runner.run(edit(side=1024, refs=1, steps=4))
        check_image(out)
        print(f"[{config}] standard edit (4 steps, first: compiles) {time.perf_counter() - t0:.1f} s"
              f" {out.timings_s}")  # fmt: skip
        out = runner.run(edit(side=1024, refs=1, steps=4, seed=1))
        print(f"[{config}] standard edit again {out.timings_s}")
        # The largest edit the config accepts: its max output pixels, max_input_images references.
        side = math.isqrt(limits.max_output_pixels) // 16 * 16
        out = runner.run(edit(side=side, refs=model.max_input_images, steps=2, seed=2))
        check_image(out, side)
        print_peaks(config, cap_gib)
    finally:
        del runner


@pytest.fixture(scope="module")
def lightning_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic LoRA of rank 64 on each block's 12 attention and feed-forward linears."""
    from serve_app.pipeline.random_weights.synthetic import build_synthetic_lora

    return build_synthetic_lora("2511", tmp_path_factory.mktemp("lightning"), rank=64)


@pytest.mark.gpus(1)
@pytest.mark.parametrize("config", list(CARDS))
def test_one_card_config_serves_a_fused_lightning_lora(
    config: str, capped: float, lightning_file: Path
) -> None:
    """The config's commented Lightning entry switched on, its LoRA file replaced by the
    synthetic one: the LoRA is fused into each linear as it loads (the transformer never in
    bf16 on the card), the id alone is served, and its 4-step edit without true CFG (1024x1024,
    one 1024x1024 reference) runs within the cap: first (compiles), then timed three times."""
    from serve_app.common.config import ModelConfig

    cap_gib = capped
    model, _ = capped_model(config, cap_gib)
    snippet = commented_lightning(ROOT / "deploy/configs" / config)
    (entry,) = snippet["loras"]
    lora = {**entry, "path": str(lightning_file), "weight_name": None}
    model = ModelConfig.model_validate({**model.model_dump(), **snippet, "loras": [lora]})
    runner = None
    try:
        runner = load(model)
        assert runner.info.served_names == [lora["name"]] and runner._hotswap is None
        assert "bf16+fp8+int8" in runner.info.placement_table
        assert not any("lora_" in n for n, _ in runner.pipe.transformer.named_parameters())
        job = dict(
            model=lora["name"], prompt="make the sky purple", num_inference_steps=4,
            true_cfg_scale=1.0, negative_prompt=None, width=1024, height=1024,
        )  # fmt: skip
        t0 = time.perf_counter()
        out = runner.run(make_job(**job, images=[random_image(1024, 1024, 0)], seeds=[0]))
        check_image(out)
        print(f"[{config}] Lightning 4-step, CFG off, first (compiles) "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        latencies = []
        for seed in (1, 2, 3):
            t0 = time.perf_counter()
            out = runner.run(make_job(**job, images=[random_image(1024, 1024, seed)], seeds=[seed]))
            latencies.append(time.perf_counter() - t0)
        print(f"[{config}] Lightning 4-step, CFG off: median {statistics.median(latencies):.3f} s"
              f" of {[round(s, 3) for s in latencies]}; {out.timings_s}")  # fmt: skip
        print_peaks(f"{config} + Lightning", cap_gib)
    finally:
        del runner


@pytest.mark.gpus(1)
def test_text_encoder_int8_and_offload_against_bf16() -> None:
    """The full-size text encoder (random weights, same seed) on a text-only prompt of 256
    tokens: relative L2 of the last hidden state against bf16, and seconds per encode."""
    import torch
    from accelerate import cpu_offload

    from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir
    from serve_app.pipeline.speed.quantization import quantize_onto

    free_gpus()
    gpu = torch.device("cuda", 0)
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0)).to(gpu)

    def build(where: str) -> Any:
        return build_component(
            variant_dir("2511"), "text_encoder", device_map={"": where}, dtype=torch.bfloat16
        )

    def encode(te: Any) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            te(input_ids=ids, output_hidden_states=True)  # warm
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hidden = te(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            torch.cuda.synchronize()
        return hidden.float(), time.perf_counter() - t0

    bf16 = build("cuda:0")
    reference, bf16_s = encode(bf16)
    del bf16
    free_gpus()
    int8 = build("cuda:0")  # made in bf16 on the GPU, then each linear quantized in place
    quantize_onto(int8, gpu, lambda m, fqn: "int8" if isinstance(m, torch.nn.Linear) else None)
    got, int8_s = encode(int8)
    int8_gib = torch.cuda.memory_allocated(0) / GiB
    del int8
    free_gpus()
    rel = float((got - reference).norm() / reference.norm())
    streamed = cpu_offload(build("cuda:0"), execution_device=gpu)  # weights copied to the CPU
    same, offload_s = encode(streamed)
    rel_offload = float((same - reference).norm() / reference.norm())
    print(f"\ntext encoder: bf16 {bf16_s:.3f} s/encode; int8 {int8_s:.3f} s/encode, "
          f"{int8_gib:.2f} GiB allocated, rel L2 vs bf16 {rel:.5f}; offload {offload_s:.3f} "
          f"s/encode, rel L2 {rel_offload:.5f}")  # fmt: skip
    assert rel < 0.2 and rel_offload < 1e-3
