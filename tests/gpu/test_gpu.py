"""The synthetic full-size model (real architecture, random weights, built on the GPUs) under
every placement, CFG-parallel, the OOM path and Ray Serve on 2 GPUs.

Skipped without CUDA (conftest). Each test prints its placement table and per-GPU memory:
`python -m pytest tests/gpu -v -s -rA`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from serve_app.common.config import AppConfig, GenerationConfig, ModelConfig
from serve_app.common.errors import InternalError
from serve_app.common.jobs import EditJob, EditOutput
from tests.fixtures import TRUE_CFG, free_port, make_job, random_image

pytestmark = pytest.mark.gpu

GiB = 1024**3
VARIANT = "2511"
TRANSFORMER, TEXT_ENCODER, VAE = "transformer", "text_encoder", "vae"


def synthetic(**fields: Any) -> ModelConfig:
    """The full-size synthetic model, planning headroom for 1024x1024 edits with one reference."""
    base: dict[str, Any] = {
        "source": "synthetic",
        "synthetic_variant": VARIANT,
        "headroom_max_pixels": 1024 * 1024,
        "headroom_ref_images": 1,
    }
    return ModelConfig(**{**base, **fields})


def job(*, side: int = 1024, ref_side: int = 1024, steps: int = 4, seed: int = 0) -> EditJob:
    return make_job(
        request_id=f"gpu-test-{side}-{steps}-{seed}", images=[random_image(ref_side, ref_side, seed)],
        prompt="make the sky purple", num_inference_steps=steps, width=side, height=side,
        seeds=[seed], **TRUE_CFG,
    )  # fmt: skip


def check_image(out: EditOutput, side: int = 1024) -> None:
    assert out.images[0].shape == (side, side, 3)
    assert out.images[0].dtype == np.uint8


def report(label: str) -> list[tuple[float, float]]:
    """Print and return (allocated GiB, peak GiB) per GPU."""
    import torch

    def stat(fn: Any, index: int) -> float:
        try:
            return float(fn(index)) / GiB
        except RuntimeError:  # nothing allocated on that device yet
            return 0.0

    rows = [
        (stat(torch.cuda.memory_allocated, i), stat(torch.cuda.max_memory_allocated, i))
        for i in range(torch.cuda.device_count())
    ]
    cells = ", ".join(
        f"cuda:{i} {torch.cuda.get_device_name(i)}: allocated {a:.2f} GiB, peak {p:.2f} GiB"
        for i, (a, p) in enumerate(rows)
    )
    print(f"\n[{label}] per-GPU memory: {cells}", flush=True)
    return rows


def free_gpus() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    for i in range(torch.cuda.device_count()):
        # Raises "Invalid device argument" while nothing was ever allocated on that device.
        with contextlib.suppress(RuntimeError):
            torch.cuda.reset_peak_memory_stats(i)


def load(model: ModelConfig) -> Any:
    from serve_app.pipeline.loading.loader import load_runner

    free_gpus()
    t0 = time.perf_counter()
    runner = load_runner(model, GenerationConfig())
    print(f"\nloaded in {time.perf_counter() - t0:.1f} s; device_map {runner.info.device_map}")
    print(runner.info.placement_table, flush=True)
    return runner


def param_devices(module: Any) -> set[str]:
    return {str(p.device) for p in module.parameters()}


@pytest.mark.gpus(1)
class TestOneGpu:
    @pytest.fixture(scope="class")
    def runner(self) -> Iterator[Any]:
        runner = load(synthetic(device_map="cuda"))
        yield runner
        del runner
        free_gpus()

    def test_full_size_edit_on_one_gpu(self, runner: Any) -> None:
        info = runner.info
        assert {info.device_map[c] for c in (TRANSFORMER, TEXT_ENCODER, VAE)} == {"cuda:0"}
        assert "strategy: single" in info.placement_table
        for name in (TRANSFORMER, TEXT_ENCODER, VAE):
            assert param_devices(getattr(runner.pipe, name)) == {"cuda:0"}
        out = runner.run(job())
        check_image(out)
        print(f"timings {out.timings_s}")
        (weights, _peak), *_ = report("1 GPU, 1024x1024, 1 ref, 4 steps CFG")
        assert weights > 50  # transformer 38.1 + text encoder 15.5 + VAE 0.2 GiB

    def test_oom_answers_gpu_out_of_memory_then_the_replica_serves(self, runner: Any) -> None:
        import torch

        from serve_app.common.metrics import NullMetrics
        from serve_app.replica.deployment import ImageEditModel

        model = ImageEditModel(
            AppConfig(model=synthetic(device_map="cuda")),
            engine_factory=lambda m, g: runner,
            metrics=NullMetrics(),
        )
        free_gpus()
        check_image(asyncio.run(model.edit(job(steps=2))))  # what a normal edit needs
        needed = torch.cuda.max_memory_reserved(0)
        total = torch.cuda.get_device_properties(0).total_memory
        cap = needed + int(1.5 * GiB)
        torch.cuda.set_per_process_memory_fraction(cap / total, 0)
        print(f"\ncap: {cap / GiB:.2f} GiB of {total / GiB:.2f} GiB", flush=True)
        try:
            with pytest.raises(InternalError) as err:
                asyncio.run(model.edit(job(side=2048, ref_side=2048, steps=2)))
            assert err.value.code == "gpu_out_of_memory"
            print(f"oversized edit answered: {err.value.code}: {err.value.message}")
            check_image(asyncio.run(model.edit(job(steps=2, seed=1))))
            assert model.stats()["oom"] == 1 and model.stats()["ok"] == 2
            model.check_health()  # still healthy
            report("1 GPU, OOM then a normal edit")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)


@pytest.mark.gpus(1)
def test_fp8_linears_on_one_gpu() -> None:
    import torch

    runner = load(synthetic(device_map="cuda", quantization="fp8", compile=True))
    try:
        assert any(
            "quantization fp8: 720 transformer linears" in note for note in runner.info.speed_notes
        )
        blocks = runner.pipe.transformer.transformer_blocks
        assert blocks[0].attn.to_q.weight.qdata.dtype == torch.float8_e4m3fn
        assert blocks[59].img_mlp.net[2].weight.qdata.dtype == torch.float8_e4m3fn
        assert blocks[0].img_mod[1].weight.dtype == torch.bfloat16  # modulation stays bf16
        assert runner.pipe.transformer.proj_out.weight.dtype == torch.bfloat16
        out = runner.run(job())
        check_image(out)
        assert out.images[0].std() > 1  # an image, not a constant (NaN would decode to 0)
        print(f"timings {out.timings_s}")
        (weights, _peak), *_ = report("1 GPU fp8, 1024x1024, 1 ref, 4 steps CFG")
        # bf16: 53.8 GiB (test above); the 720 block linears halve (25.3 -> 12.7 GiB).
        assert 35 < weights < 45  # measured 41.2: modulation linears (13 GiB) stay bf16
    finally:
        del runner
        free_gpus()


@pytest.mark.gpus(2)
def test_two_gpus_balanced_puts_weights_on_both() -> None:
    import torch

    runner = load(synthetic(device_map="auto"))
    try:
        info = runner.info
        assert "strategy: components" in info.placement_table
        assert {info.device_map[TRANSFORMER], info.device_map[TEXT_ENCODER]} == {
            "cuda:0",
            "cuda:1",
        }
        assert all(torch.cuda.memory_allocated(i) > GiB for i in (0, 1))
        out = runner.run(job())
        check_image(out)
        print(f"timings {out.timings_s}")
        report("2 GPUs balanced (components), 1024x1024, 4 steps CFG")
    finally:
        del runner
        free_gpus()


@pytest.mark.gpus(2)
def test_two_gpus_31_gib_each_split_the_transformer_nothing_on_cpu() -> None:
    # 31 GiB: weights 53.7 GiB + headroom (2.3 GiB per transformer GPU, 4.5 GiB where the text
    # encoder and VAE sit) do not fit 2 x 30 GiB.
    runner = load(synthetic(device_map="auto", max_memory_gib={0: 31, 1: 31}))
    try:
        assert "strategy: split" in runner.info.placement_table
        assert set(runner.info.device_map[TRANSFORMER].split(",")) == {"cuda:0", "cuda:1"}
        assert param_devices(runner.pipe.transformer) == {"cuda:0", "cuda:1"}
        for name in (TEXT_ENCODER, VAE):
            assert all(d.startswith("cuda") for d in param_devices(getattr(runner.pipe, name)))
        out = runner.run(job())
        check_image(out)
        print(f"timings {out.timings_s}")
        rows = report("2 GPUs x 31 GiB (split), 1024x1024, 4 steps CFG")
        assert all(peak <= 31 for _, peak in rows), "the plan's 31 GiB budget was exceeded"
    finally:
        del runner
        free_gpus()


@pytest.mark.gpus(2)
def test_ray_serve_two_1gpu_replicas_then_one_2gpu_replica() -> None:
    import ray
    from ray import serve

    from bench.run import APP, GpuSampler, Scenario, deploy, edit_http, reference_png

    free_gpus()
    png = reference_png()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sampler = GpuSampler().start()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        ready = deploy(
            Scenario(name="two-replicas", gpus=1, replicas=2), url, steps=4, timeout_s=400
        )
        print(f"\n/ready (2 x 1 GPU): {ready}")
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: edit_http(url, png, steps=2, seed=i), range(2)))
        print(f"2 concurrent HTTP edits: {[round(a.seconds, 2) for a in answers]} s")
        handle = serve.get_deployment_handle("QwenImageEditModel", app_name=APP)
        seen: dict[str, dict[str, str]] = {}
        for _ in range(60):
            info = handle.info.remote().result()
            seen[info.device_map.get("cuda_visible_devices", "?")] = info.device_map
            if len(seen) == 2:
                break
        print(f"replicas: {seen}")
        assert set(seen) == {"0", "1"}
        for device_map in seen.values():
            assert {device_map[c] for c in (TRANSFORMER, TEXT_ENCODER, VAE)} == {"cuda:0"}
        print(f"peak GiB per GPU (nvidia-smi): {sampler.peaks_gib()}")
        serve.delete(APP)

        sampler.reset()
        ready = deploy(
            Scenario(name="one-replica", gpus=2, replicas=1), url, steps=4, timeout_s=400
        )
        print(f"/ready (1 x 2 GPUs): {ready}")
        info = serve.get_deployment_handle("QwenImageEditModel", app_name=APP).info.remote()
        device_map = info.result().device_map
        print(f"replica: {device_map}")
        assert sorted(device_map["cuda_visible_devices"].split(",")) == ["0", "1"]
        assert {device_map[TRANSFORMER], device_map[TEXT_ENCODER]} == {"cuda:0", "cuda:1"}
        seconds = edit_http(url, png, steps=2).seconds
        print(f"HTTP edit on the 2-GPU replica: {seconds:.2f} s")
        print(f"peak GiB per GPU (nvidia-smi): {sampler.peaks_gib()}")
    finally:
        sampler.stop()
        serve.shutdown()
        ray.shutdown()
