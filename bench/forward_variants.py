"""What else one compiled forward could gain: attention backends, compile options, launch costs.

    python -m bench.forward_variants [--variants native_dyn,native_static,...] [--sdpa]
                                     [--repeats 5] [--out bench/results/forward-variants.json]

Builds the synthetic full-size 2511 transformer (random weights) on cuda:0 and times one forward
of the standard edit's shape (8192 image + 219 text tokens) with CUDA synchronisation, median of
`--repeats` (5) after a warm-up, per variant (each recompiles
`compile_repeated_blocks(fullgraph=True)`):

- `native_dyn`: what the shipped configs run (native attention, dynamic=True); `cudnn_dyn`,
  `flash_dyn`: diffusers' `_native_cudnn` / `_native_flash` backends instead;
- `native_dyn_gelu`: as `native_dyn` with the feed-forwards' GELU in the GEMM's epilogue
  (`serve_app.pipeline.speed.gelu`, what compile on CUDA runs);
- `native_dyn_gelu_mod`: as `native_dyn_gelu` with the modulation tables
  (`serve_app.pipeline.speed.modulation`, what every replica runs; the table of a 50-step schedule
  is made at the first call, each timed forward picks its rows);
- `native_dyn_gelu_mod_stackrope`: as `native_dyn_gelu_mod` with the rotary embedding's pairs
  joined by `stack`, as `serve_app.pipeline.speed.rope` wrote it before (the same values);
- `native_dyn_gelu_mod_joint`, `fp8_dyn_mod_sig_joint`: as `native_dyn_gelu_mod` and
  `fp8_dyn_mod_sig` with the text and image streams joined before the QK norm by the Triton
  kernel (`serve_app.pipeline.speed.joint_qk`, `norm_rope_kernel`: what compile on CUDA runs);
  `native_dyn_gelu_mod_jointpt`: joined by the same steps as PyTorch operations;
- `fp8_dyn_mod`, `fp8_dyn_mod_sig`: the transformer quantized as `quantization: fp8` does
  (torchao), with the modulation tables; `_sig` computes the feed-forwards' tanh GELU as
  x * sigmoid(2u) (`serve_app.pipeline.speed.gelu.SigmoidGELU`, what compile on CUDA runs with fp8).
  Quantizing cannot be undone: fp8 variants come after every bf16 one;
- `native_static`: dynamic=False (recompiles for every prompt length);
- `native_dyn_maxat` (+`_cd`): inductor's max-autotune GEMM templates (and coordinate descent);
- `launch_base`, `launch_skipguard` (torch.compiler.set_stance(skip_guard_eval_unsafe=True)),
  `launch_cpp` (inductor's C++ wrapper), `launch_cudagraph` (mode="reduce-overhead"): the same
  forward, plus `piped_ms` (6 forwards back to back, one sync: as the pipeline runs them) and
  `small_input_ms` (a 128-token image: the GPU has almost nothing to do, so this is the host's
  cost of launching one forward).

`kernels_ms` (for `native_dyn`, the `native_dyn_gelu*` and `fp8_*` variants and `launch_base`)
sums CUDA kernel time per name over one forward. A label may be given twice as `label#2`
(interleaved runs: GPU clocks drift by a few per cent between minutes).
`--sdpa` also times torch's SDPA alone on the forward's attention shape per backend, for 24, 12
and 6 heads, with and without the key-padding mask that Ulysses' text padding brings. Run it with
CUDA_VISIBLE_DEVICES to pick the GPU; `cpu` as the first argument is a smoke test that needs a
tiny `--overrides` config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.flops import transformer_flops

# label -> (attention backend, compile dynamic, inductor options; "_stance"/"_mode" are ours)
VARIANTS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "native_dyn": ("native", True, {}),
    "cudnn_dyn": ("_native_cudnn", True, {}),
    "flash_dyn": ("_native_flash", True, {}),
    "native_static": ("native", False, {}),
    "native_dyn_maxat": ("native", True, {"max_autotune_gemm": True}),
    "native_dyn_maxat_cd": (
        "native",
        True,
        {"max_autotune_gemm": True, "coordinate_descent_tuning": True},
    ),
    "launch_base": ("native", True, {}),
    "launch_skipguard": ("native", True, {"_stance": True}),
    "launch_cpp": ("native", True, {"cpp_wrapper": True}),
    "launch_cudagraph": ("native", True, {"_mode": "reduce-overhead"}),
    "native_dyn_gelu": ("native", True, {"_gelu": True}),
    "native_dyn_gelu_mod": ("native", True, {"_gelu": True, "_mod": True}),
    "native_dyn_gelu_mod_stackrope": (
        "native",
        True,
        {"_gelu": True, "_mod": True, "_stack": True},
    ),
    "native_dyn_gelu_mod_joint": ("native", True, {"_gelu": True, "_mod": True, "_joint": True}),
    "native_dyn_gelu_mod_jointpt": (
        "native",
        True,
        {"_gelu": True, "_mod": True, "_joint": True, "_pt": True},
    ),
    "fp8_dyn_mod": ("native", True, {"_fp8": True, "_mod": True}),
    "fp8_dyn_mod_sig": ("native", True, {"_fp8": True, "_mod": True, "_sig": True}),
    "fp8_dyn_mod_sig_joint": (
        "native",
        True,
        {"_fp8": True, "_mod": True, "_sig": True, "_joint": True},
    ),
}
_PROFILED = (
    "native_dyn",
    "native_dyn_gelu",
    "native_dyn_gelu_mod",
    "native_dyn_gelu_mod_stackrope",
    "native_dyn_gelu_mod_joint",
    "native_dyn_gelu_mod_jointpt",
    "fp8_dyn_mod",
    "fp8_dyn_mod_sig",
    "fp8_dyn_mod_sig_joint",
)


def _stacked_rope(
    x: Any, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1
) -> Any:
    """The rotary embedding as `serve_app.pipeline.speed.rope` wrote it before (pairs joined by
    stack)."""
    import torch

    from serve_app.pipeline.speed import rope

    if use_real or not torch.is_complex(freqs_cis):
        return rope.apply_rotary_emb_real(x, freqs_cis, use_real, use_real_unbind_dim)
    freqs = torch.view_as_real(freqs_cis).unsqueeze(1)
    cos, sin = freqs[..., 0], freqs[..., 1]
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)


_INDUCTOR_KEYS = ("max_autotune_gemm", "coordinate_descent_tuning", "cpp_wrapper")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sdpa", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--overrides", type=Path, default=None, help="transformer config JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from diffusers.models.transformers import transformer_qwenimage as qwen

    from bench.run import versions
    from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir
    from serve_app.pipeline.speed import gelu, joint_qk, modulation, rope

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    overrides = json.loads(args.overrides.read_text()) if args.overrides else None
    torch.manual_seed(0)
    transformer: Any = build_component(
        variant_dir("2511"), "transformer",
        device_map={"": device.index if on_gpu else "cpu"}, dtype=torch.bfloat16,
        overrides=overrides,
    )  # fmt: skip
    sync: Callable[[], None] = torch.cuda.synchronize if on_gpu else (lambda: None)
    config = dict(transformer.config)
    side = 64 if on_gpu else 8  # latent patches per side of the 1024x1024 output and reference
    inputs = _inputs(torch, config, device, side=side, text=219)
    flops = transformer_flops(config, image_tokens=2 * side * side, text_tokens=219)

    def forward() -> Any:
        with torch.inference_mode():
            return transformer(**inputs)[0]

    def timed(repeats: int = args.repeats) -> tuple[float, list[float], Any]:
        out = forward()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = forward()
            sync()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times), times, out

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "image_tokens": 2 * side * side,
        "text_tokens": 219,
        "gflop_per_forward": round(flops / 1e9, 1),
        "variants": {},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    import torch._dynamo
    import torch._inductor.config as inductor

    defaults = {k: getattr(inductor, k) for k in _INDUCTOR_KEYS}
    rope.install_real_rope()
    schedule = torch.linspace(1000, 0, 51, device=device)[:-1]
    reference = None
    quantized = False
    for label in [v for v in args.variants.split(",") if v]:
        backend, dynamic, options = VARIANTS[label.split("#")[0]]  # "name#2": a second run
        options = dict(options)
        stance, mode = options.pop("_stance", False), options.pop("_mode", None)
        fused_gelu = options.pop("_gelu", False)
        tabled = options.pop("_mod", False)
        fp8, sigmoid_gelu = options.pop("_fp8", False), options.pop("_sig", False)
        joined, joined_pt = options.pop("_joint", False), options.pop("_pt", False)
        qwen.apply_rotary_emb_qwen = (  # type: ignore[assignment]
            _stacked_rope if options.pop("_stack", False) else rope.apply_rotary_emb_real
        )
        try:
            if quantized and not fp8:
                raise ValueError("bf16 variants must come before the fp8 ones")
            if fp8 and not quantized:
                from serve_app.pipeline.speed.quantization import quantize_transformer

                quantize_transformer(transformer, "fp8")
                quantized = True
            torch._dynamo.reset()
            for key, value in {**defaults, **options}.items():
                setattr(inductor, key, value)
            for block in transformer.transformer_blocks:
                block._compiled_call_impl = None
            transformer.set_attention_backend(backend)
            joint_qk.uninstall_joint_qk(transformer)
            joint_qk.disable_kernel()
            if joined:
                joint_qk.install_joint_qk(transformer)
                if not joined_pt:
                    joint_qk.enable_kernel()
            gelu.uninstall_gelu_epilogue(transformer)
            if fused_gelu:
                gelu.install_gelu_epilogue(transformer)
            if sigmoid_gelu:
                gelu.install_sigmoid_gelu(transformer)
            if tabled:  # 50 timesteps, the forward's 0.5 (x 1000) among them
                modulation.install_modulation_tables(transformer, lambda: schedule)
            else:
                modulation.uninstall_modulation_tables(transformer)
            transformer.compile_repeated_blocks(
                fullgraph=True, dynamic=dynamic, **({"mode": mode} if mode else {})
            )
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=False)
            t0 = time.perf_counter()
            forward()
            sync()
            first_s = time.perf_counter() - t0
            if stance:
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            ms, times, out = timed()
            out = out.float()
            reference = out if reference is None else reference
            entry: dict[str, Any] = {
                "backend": backend, "dynamic": dynamic, "ms_per_forward": round(ms, 1),
                "all_ms": [round(t, 1) for t in times], "first_call_s": round(first_s, 1),
                "tflops": round(flops / ms / 1e9, 1),
                "rel_err_vs_first": round(float((out - reference).norm() / reference.norm()), 5),
            }  # fmt: skip
            if label.startswith("launch"):
                entry.update(_launch_costs(forward, inputs, sync))
            if on_gpu and label.split("#")[0] in (*_PROFILED, "launch_base"):
                entry["kernels_ms"] = _kernels(forward, sync)
        except Exception as exc:  # a variant this torch cannot run: recorded, the rest go on
            entry = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        results["variants"][label] = entry
        print(label, json.dumps(entry), flush=True)
    if args.sdpa and on_gpu:
        results["sdpa"] = _sdpa(torch, device, tokens=2 * side * side + 219, sync=sync)
        print("sdpa", json.dumps(results["sdpa"]), flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _inputs(torch: Any, config: dict[str, Any], device: Any, *, side: int, text: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    bf16 = torch.bfloat16
    width = int(config["joint_attention_dim"])
    at = {"device": device, "generator": gen, "dtype": bf16}
    return {
        "hidden_states": torch.randn(1, 2 * side * side, 64, **at),
        "encoder_hidden_states": torch.randn(1, text, width, **at),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5], device=device, dtype=bf16),
        "img_shapes": [[(1, side, side), (1, side, side)]],
        "return_dict": False,
    }  # fmt: skip


def _launch_costs(forward: Callable[[], Any], inputs: dict[str, Any], sync: Any) -> dict:
    sync()
    t0 = time.perf_counter()
    for _ in range(6):
        forward()
    launched = time.perf_counter() - t0
    sync()
    piped_ms = (time.perf_counter() - t0) / 6 * 1000
    full = dict(inputs)
    inputs["hidden_states"] = inputs["hidden_states"][:, :128]
    inputs["img_shapes"] = [[(1, 8, 8), (1, 8, 8)]]
    try:
        forward()
        sync()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            forward()
            sync()
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        inputs.update(full)
    return {
        "piped_ms": round(piped_ms, 1),
        "host_ms_for_6_queued": round(1000 * launched / 6, 1),
        "small_input_ms": round(statistics.median(times), 1),
    }


def _kernels(forward: Callable[[], Any], sync: Any, *, top: int = 14) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        sync()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    table: dict[str, float] = {}
    for e in events[:top]:  # whole names: inductor's kernels share long prefixes
        table[e.key] = round(table.get(e.key, 0.0) + e.device_time_total / 1000, 2)
    table["(all)"] = round(sum(e.device_time_total for e in events) / 1000, 2)
    return table


def _sdpa(torch: Any, device: Any, *, tokens: int, sync: Any) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    backends = {
        "default": None, "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }  # fmt: skip
    # All 24 heads (one GPU, CFG ranks), 12 and 6 (a Ulysses 2 / 4 rank's share); unmasked, and
    # with the key-padding mask QwenImage builds when text is padded for Ulysses ([B, 1, 1, S]).
    mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool, device=device)
    mask[..., -1] = False
    cases = [(h, m) for h in (24, 12, 6) for m in (False, True)]
    for (heads, masked), (name, backend) in itertools.product(cases, backends.items()):
        q, k, v = (
            torch.randn(1, heads, tokens, 128, device=device, dtype=torch.bfloat16) for _ in "qkv"
        )
        attn_mask = mask if masked else None

        def attend(backend: Any = backend, qkv: tuple = (q, k, v), mask: Any = attn_mask) -> Any:
            sdpa = torch.nn.functional.scaled_dot_product_attention
            if backend is None:
                return sdpa(*qkv, attn_mask=mask)
            with sdpa_kernel([backend]):
                return sdpa(*qkv, attn_mask=mask)

        try:
            for _ in range(3):
                attend()
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                attend()
            sync()
            ms = (time.perf_counter() - t0) / 20 * 1000
            out[f"{name}/h{heads}{'/masked' if masked else ''}"] = {
                "ms_per_layer": round(ms, 3), "ms_60_layers": round(60 * ms, 1),
                "tflops": round(4 * tokens * tokens * 128 * heads / ms / 1e9, 1),
            }  # fmt: skip
        except Exception as exc:
            out[f"{name}/h{heads}{'/masked' if masked else ''}"] = {"error": str(exc)[:200]}
    return out


if __name__ == "__main__":
    sys.exit(main())
