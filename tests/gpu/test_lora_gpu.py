"""LoRAs on the full-size synthetic 2511 transformer on one GPU, with a synthetic LoRA of rank 64
on each block's 12 attention and feed-forward linears: the hot-swapped and the fused weights
give what diffusers' own (unfused) LoRA gives, as the published recipe runs it; switching ids
never recompiles the compiled blocks; fp8 after fusing stays as close as fp8 itself is.

Skipped without CUDA (conftest): `python -m pytest tests/gpu/test_lora_gpu.py -v -s`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.blocks import bf16, block_inputs, full_width_blocks, rel

pytestmark = pytest.mark.gpu
LAYERS = 60  # the whole transformer


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serve_app.pipeline.random_weights.synthetic import build_synthetic_lora

    return build_synthetic_lora("2511", tmp_path_factory.mktemp("lora"), rank=64)


def _forward(transformer: Any) -> Any:
    import torch

    args = {**bf16(block_inputs()), "timestep": torch.tensor([0.5], device="cuda")}
    with torch.inference_mode():
        return transformer(**args)[0].float()


def _collect() -> None:
    """Return the memory of what the caller deleted (the next full transformer needs it)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.gpus(1)
def test_hotswap_and_fused_give_diffusers_lora_and_switching_never_recompiles(
    lora_file: Path,
) -> None:
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from serve_app.common.config import LoraConfig
    from serve_app.pipeline.loading.lora import HotSwap

    transformer = full_width_blocks(LAYERS)
    base = _forward(transformer)
    transformer.load_lora_adapter(str(lora_file), adapter_name="l", prefix="transformer")
    recipe = _forward(transformer)  # diffusers' unfused LoRA, as load_lora_weights leaves it
    effect = rel(recipe, base)
    assert effect > 0.005, effect  # the LoRA changes the forward: the comparisons below can fail

    swap = HotSwap.build(transformer, [LoraConfig(name="l", path=str(lora_file))])
    assert swap.linears == 12 * LAYERS
    assert not any("lora_" in name for name, _ in transformer.named_parameters())
    assert torch.equal(_forward(transformer), base)  # the base id: plain base weights
    swap.activate("l")
    hot = _forward(transformer)
    switch_ms = {}
    for model_id in (None, "l"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        swap.activate(model_id)
        torch.cuda.synchronize()
        switch_ms[model_id] = (time.perf_counter() - t0) * 1000

    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True)
    compiled_hot = _forward(transformer)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        swap.activate(None)
        compiled_base = _forward(transformer)
        swap.activate("l")
        compiled_hot_again = _forward(transformer)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(compiled_hot, compiled_hot_again)
    compiled_err = rel(compiled_hot, hot)
    compiled_base_err = rel(compiled_base, base)

    # diffusers' own fuse of the same file, on the base weights the swap put back (done last:
    # fuse + unfuse in bf16 does not give the base weights back bit for bit).
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None
    torch._dynamo.reset()
    swap.activate(None)
    transformer.load_lora_adapter(str(lora_file), adapter_name="l", prefix="transformer")
    transformer.fuse_lora(adapter_names=["l"])
    fused = _forward(transformer)
    hot_vs_fused = rel(hot, fused)
    fused_err = rel(fused, recipe)
    print(
        f"\nLoRA effect on the forward {effect:.4f}; vs diffusers' unfused LoRA: fused"
        f" {fused_err:.2e}; hot-swap vs fused {hot_vs_fused:.2e}; compiled hot-swap vs eager"
        f" {compiled_err:.4f} (compiled base vs eager base {compiled_base_err:.4f});"
        f" switch to base {switch_ms[None]:.0f} ms, to the LoRA {switch_ms['l']:.0f} ms"
        f" ({swap.linears} linears)"
    )
    # Switched in, the LoRA is the weights diffusers' fuse_lora makes (the same arithmetic).
    assert hot_vs_fused < 1e-3
    # One bf16 rounding of W + BA in place of a separate product; through 60 random-weight
    # blocks that is the size of what compile itself changes.
    assert fused_err < effect / 4
    assert compiled_err < compiled_base_err + 0.01  # compile's own difference, nothing more
    del transformer, swap
    _collect()


@pytest.mark.gpus(1)
def test_fp8_after_fusing_and_under_a_hot_swap_stays_as_close_as_fp8_itself(
    lora_file: Path,
) -> None:
    """The Lightning authors' warning (a LoRA over a naively down-cast fp8 base gives grid
    artifacts) does not apply: fp8 here is scaled per row and quantizes fused bf16 weights, at
    load (fused) or at each switch (hot-swap); switching back gives the loaded fp8 base."""
    import torch

    from serve_app.common.config import LoraConfig
    from serve_app.pipeline.loading.lora import HotSwap
    from serve_app.pipeline.speed.quantization import quantize_transformer

    def fp8_error(*, lora: str) -> float:
        transformer = full_width_blocks(LAYERS)
        swap = None
        if lora != "none":
            transformer.load_lora_adapter(str(lora_file), adapter_name="l", prefix="transformer")
        if lora == "fused":
            transformer.fuse_lora(adapter_names=["l"])
            transformer.unload_lora()
        if lora == "hotswap":
            swap = HotSwap.build(transformer, [LoraConfig(name="l", path=str(lora_file))])
            swap.activate("l")
        reference = _forward(transformer)  # bf16, the same LoRA
        if swap is not None:
            swap.activate(None)  # quantized as loaded: the base weights
        report = quantize_transformer(transformer, "fp8")
        assert report is not None and report.layers == 12 * LAYERS
        if swap is not None:
            fp8_base = _forward(transformer)
            swap.activate("l")  # the fused weights, quantized afresh
            error = rel(_forward(transformer), reference)
            swap.activate(None)
            assert torch.equal(_forward(transformer), fp8_base)  # the loaded fp8 bytes again
        else:
            error = rel(_forward(transformer), reference)
        del transformer, swap, reference
        _collect()
        return error

    _collect()  # whatever an earlier test left
    base, fused, hot = (fp8_error(lora=mode) for mode in ("none", "fused", "hotswap"))
    print(
        f"\nfp8 vs bf16, same weights: base {base:.4f}, fused LoRA {fused:.4f}, hot-swap {hot:.4f}"
    )
    assert fused < 1.5 * base + 0.005
    assert hot < 1.5 * base + 0.005
