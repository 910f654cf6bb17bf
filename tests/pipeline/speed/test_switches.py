"""The speed switches (`pipeline.speed`) on a fake transformer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from serve_app.pipeline.speed.switches import apply_speed_switches, find_cxx_compiler
from tests.pipeline.placement.test_load_plan import model


class Float8Like(torch.Tensor):
    """Stands in for torchao's float8 weights (a Tensor subclass)."""


class FakeAttention:
    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_qwenimage import (
            QwenDoubleStreamAttnProcessor2_0,
        )

        self.processor: Any = QwenDoubleStreamAttnProcessor2_0()

    def set_processor(self, processor: Any) -> None:
        self.processor = processor


class FakeTransformer:
    def __init__(self, devices: list[str], hooked: bool = False) -> None:
        from diffusers.models.activations import GELU

        self._params = [torch.zeros(1, device="cpu") for _ in devices]
        self._devices = devices
        # What install_gelu_epilogue looks for: the feed-forwards' tanh GELU (and another kind).
        self.gelus = [GELU(4, 8, approximate="tanh"), GELU(4, 8, approximate="none")]
        self.gelus = [g.bfloat16() for g in self.gelus]
        # As fp8 leaves it: the projection's weight a tensor subclass (torchao's float8).
        self.fp8_gelu = GELU(4, 8, approximate="tanh").bfloat16()
        weight = self.fp8_gelu.proj.weight.detach().as_subclass(Float8Like)
        self.fp8_gelu.proj.weight = torch.nn.Parameter(weight, requires_grad=False)
        # What install_joint_qk looks for: an attention running diffusers' joint processor.
        self.attention = FakeAttention()
        if hooked:
            self._hf_hook = object()
        self.backend: str | None = None
        self.compiled: dict[str, Any] | None = None

    def parameters(self) -> Any:
        class P:
            def __init__(self, device: str) -> None:
                self.device = device

        return [P(d) for d in self._devices]

    def modules(self) -> Any:
        return iter([*self.gelus, self.fp8_gelu, self.attention])

    def set_attention_backend(self, name: str) -> None:
        self.backend = name

    def compile_repeated_blocks(self, **kwargs: Any) -> None:
        self.compiled = kwargs


@pytest.fixture
def restore_compile_globals() -> Iterator[None]:
    """apply_speed_switches patches process-wide state (diffusers' RoPE, inductor's config)."""
    import torch._inductor.config

    from serve_app.pipeline.speed.joint_qk import disable_kernel
    from serve_app.pipeline.speed.rope import uninstall_real_rope

    cpp_wrapper = torch._inductor.config.cpp_wrapper
    yield
    uninstall_real_rope()
    disable_kernel()
    torch._inductor.config.cpp_wrapper = cpp_wrapper


def test_speed_switches_apply_to_the_transformer(restore_compile_globals: None) -> None:
    import torch._inductor.config

    transformer = FakeTransformer(["cuda:0"])
    cfg = model(compile=True, compile_dynamic=True, attention_backend="_native_cudnn")
    notes = apply_speed_switches(transformer, cfg)
    assert transformer.backend == "_native_cudnn"
    assert transformer.compiled == {"fullgraph": True, "dynamic": True}
    assert any("compile" in n for n in notes)
    assert "rotary embedding: real arithmetic (fused by compile)" in notes
    assert "feed-forward GELU: in the GEMM epilogue of 1 linears" in notes
    assert [type(g).__name__ for g in transformer.gelus] == ["EpilogueGELU", "GELU"]
    # fp8's projection (a tensor subclass) keeps its GEMM; its tanh GELU takes the sigmoid form.
    assert "feed-forward GELU: as x * sigmoid(2u) after 1 linears" in notes
    assert type(transformer.fp8_gelu).__name__ == "SigmoidGELU"
    # The joint attention's query and key from the Triton kernel (triton comes with torch).
    assert type(transformer.attention.processor).__name__ == "JointQKAttnProcessor"
    assert (
        "joint attention: query and key normed, rotated and joined by one Triton kernel in 1 attentions"
        in notes
    )
    assert not torch._inductor.config.cpp_wrapper


def test_gelu_epilogue_only_on_cuda(restore_compile_globals: None) -> None:
    # On CPU torch's _addmm_activation is the erf GELU, not the model's tanh one.
    transformer = FakeTransformer(["cpu"])
    notes = apply_speed_switches(transformer, model(compile=True))
    assert transformer.compiled is not None
    assert not any("GELU" in n for n in notes)
    assert [type(g).__name__ for g in transformer.gelus] == ["GELU", "GELU"]
    assert type(transformer.fp8_gelu).__name__ == "GELU"
    assert type(transformer.attention.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0"


def test_cpp_wrapper_switch_sets_inductor_before_compiling(restore_compile_globals: None) -> None:
    import torch._inductor.config

    seen: list[bool] = []

    class Recording(FakeTransformer):
        def compile_repeated_blocks(self, **kwargs: Any) -> None:
            seen.append(torch._inductor.config.cpp_wrapper)

    cfg = model(compile=True, compile_cpp_wrapper=True)
    notes = apply_speed_switches(Recording(["cuda:0"]), cfg, find_cxx=lambda: "/usr/bin/g++")
    assert seen == [True]
    assert "compile: inductor C++ wrapper (kernel launches from C++)" in notes


def test_cpp_wrapper_stays_off_without_a_compiler(
    restore_compile_globals: None, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._inductor.config

    seen: list[bool] = []

    class Recording(FakeTransformer):
        def compile_repeated_blocks(self, **kwargs: Any) -> None:
            seen.append(torch._inductor.config.cpp_wrapper)

    cfg = model(compile=True, compile_cpp_wrapper=True)
    with caplog.at_level("WARNING", logger="ray.serve"):
        notes = apply_speed_switches(Recording(["cuda:0"]), cfg, find_cxx=lambda: None)
    # Still compiled, without the wrapper, and the replica log says why and how to fix it.
    assert seen == [False]
    (warning,) = [n for n in notes if "compile_cpp_wrapper" in n]
    assert "no C++ compiler" in warning and "CXX" in warning and "g++" in warning
    assert any(r.levelname == "WARNING" and "no C++ compiler" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("environ", "found", "expected"),
    [
        ({}, {"g++": "/usr/bin/g++"}, "/usr/bin/g++"),
        (
            {"CXX": "clang++"},
            {"clang++": "/opt/llvm/bin/clang++", "g++": "/usr/bin/g++"},
            "/opt/llvm/bin/clang++",
        ),
        # inductor takes $CXX or g++ and nothing else: c++ / clang++ alone are not used.
        ({}, {"c++": "/usr/bin/c++", "clang++": "/usr/bin/clang++"}, None),
        ({"CXX": "/missing/g++"}, {"g++": "/usr/bin/g++"}, None),
    ],
)
def test_find_cxx_compiler_looks_where_inductor_does(
    environ: dict[str, str], found: dict[str, str], expected: str | None
) -> None:
    assert find_cxx_compiler(environ=environ, which=found.get) == expected


def test_compile_is_skipped_for_a_split_transformer() -> None:
    split = FakeTransformer(["cuda:0", "cuda:1"], hooked=True)
    notes = apply_speed_switches(split, model(compile=True))
    assert split.compiled is None and "compile skipped" in notes[0]
    assert apply_speed_switches(FakeTransformer(["cpu"]), model()) == []


def test_compile_text_encoder_compiles_each_repeated_layer_and_keeps_the_output(
    tiny_models: Any,
) -> None:
    """Every decoder layer and vision block is compiled (dynamic shapes); prompts of two
    lengths then give what the eager encoder gives, without recompiling for the second."""
    import torch
    import torch._dynamo
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image
    from torch._dynamo.utils import counters

    from serve_app.pipeline.speed.switches import compile_text_encoder
    from tests.fixtures import red_left

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models("2511"))
    image = [Image.fromarray(red_left())]

    def encode(prompt: str) -> Any:
        with torch.inference_mode():
            return pipe.encode_prompt(prompt=prompt, image=image, device="cpu")[0]

    prompts = ("make it blue", "make the left half a deep blue and the right half snow white")
    eager = [encode(p) for p in prompts]
    torch._dynamo.reset()
    counters.clear()
    note = compile_text_encoder(pipe.text_encoder, backend="eager")
    try:
        compiled = [encode(prompts[0])]
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled.append(encode(prompts[1]))
    finally:
        torch._dynamo.reset()
    model = pipe.text_encoder.model
    layers = [*model.language_model.layers, *model.visual.blocks]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert "decoder layers and" in note and "vision blocks" in note
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs
    assert eager[0].shape != eager[1].shape  # two prompt lengths, one compiled graph
    for want, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, want)


def test_compile_text_encoder_says_so_when_it_finds_no_layers() -> None:
    from serve_app.pipeline.speed.switches import compile_text_encoder

    assert compile_text_encoder(torch.nn.Linear(2, 2)).startswith("warning: compile_text_encoder")
