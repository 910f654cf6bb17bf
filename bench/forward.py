"""One full-size transformer forward, per attention backend, eager and compiled.

    python -m bench.forward [--variant 2511] [--repeats 3] [--out bench/results/forward.json]

Builds the synthetic full-size transformer (random weights) on cuda:0, feeds it the token counts of
a 1024x1024 edit with one 1024x1024 reference (8192 image tokens) and the text-token count of a
short prompt, and times forwards with CUDA events (median after a warm-up): every attention
backend diffusers offers that is usable here, then `compile_repeated_blocks(fullgraph=True)` with
the fastest. Each backend's output is compared with the default backend's (relative L2 error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.flops import image_tokens, transformer_flops

BACKENDS = (
    "native",
    "_native_flash",
    "_native_cudnn",
    "_native_efficient",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="2511", choices=("2509", "2511"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=219)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="also time FP8 linears (torchao)")
    parser.add_argument("--only-fp8", action="store_true", help="native bf16 reference + FP8")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels per forward")
    parser.add_argument("--quick-fp8", action="store_true", help="only the compiled FP8 default")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda:0", help="cpu: smoke test with --overrides")
    parser.add_argument("--overrides", type=Path, default=None, help="transformer config JSON")
    args = parser.parse_args(argv)

    import torch

    from bench.run import versions
    from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir

    torch.manual_seed(0)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    overrides = json.loads(args.overrides.read_text()) if args.overrides else None
    transformer: Any = build_component(
        variant_dir(args.variant),
        "transformer",
        device_map={"": device.index if on_gpu else "cpu"},
        dtype=torch.bfloat16,
        overrides=overrides,
    )
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    build_s = time.perf_counter() - t0
    config = dict(transformer.config)
    side = args.side // 16
    img = image_tokens(args.side, args.side, references=1)
    txt = args.text_tokens
    flops = transformer_flops(config, image_tokens=img, text_tokens=txt)
    gen = torch.Generator(device=device).manual_seed(1)
    bf16 = torch.bfloat16
    inputs = {
        "hidden_states": torch.randn(1, img, 64, device=device, generator=gen, dtype=bf16),
        "encoder_hidden_states": torch.randn(
            1, txt, int(config["joint_attention_dim"]), device=device, generator=gen,
            dtype=torch.bfloat16,
        ),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        "img_shapes": [[(1, side, side), (1, 1024 // 16, 1024 // 16)]],
        "return_dict": False,
    }  # fmt: skip

    def forward() -> Any:
        with torch.inference_mode():
            return transformer(**inputs)[0]

    def timed(repeats: int) -> tuple[float, Any]:
        out = forward()  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = forward()
            sync()
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times), out

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "variant": args.variant,
        "image_tokens": img,
        "text_tokens": txt,
        "gflop_per_forward": round(flops / 1e9, 1),
        "build_s": round(build_s, 2),
        "weights_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2) if on_gpu else None,
        "backends": {},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    reference = None
    for name in ("native",) if args.only_fp8 else BACKENDS:
        try:
            transformer.set_attention_backend(name)
            ms, out = timed(args.repeats)
        except Exception as exc:  # unavailable here (package missing) or unsupported
            results["backends"][name] = {"available": False, "error": str(exc).split("\n")[0][:200]}
            print(f"{name:20s} unavailable: {results['backends'][name]['error']}", flush=True)
            continue
        out = out.float()
        if reference is None:
            reference = out
        rel = float((out - reference).norm() / reference.norm())
        entry = {
            "available": True,
            "ms_per_forward": round(ms, 1),
            "tflops": round(flops / ms / 1e9, 1),
            "rel_err_vs_native": round(rel, 5),
            "finite": bool(torch.isfinite(out).all()),
        }
        results["backends"][name] = entry
        print(f"{name:20s} {entry}", flush=True)
    usable = {k: v for k, v in results["backends"].items() if v.get("available") and v["finite"]}
    best = min(usable, key=lambda k: usable[k]["ms_per_forward"])
    results["fastest_eager_backend"] = best
    if on_gpu:
        results["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not args.no_compile:
        results["compiled"] = {}
        import torch._dynamo

        from serve_app.pipeline.speed import rope

        for label, backend, dynamic in (
            ("static", best, None),
            ("dynamic", best, True),
            ("dynamic_real_rope", best, True),
        ):
            try:
                if label == "dynamic_real_rope":
                    rope.install_real_rope()
                else:
                    rope.uninstall_real_rope()
                torch._dynamo.reset()
                transformer.set_attention_backend(backend)
                transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic)
                t1 = time.perf_counter()
                forward()
                sync()
                compile_s = time.perf_counter() - t1
                ms, out = timed(args.repeats)
                assert reference is not None
                rel = float((out.float() - reference).norm() / reference.norm())
                entry: dict[str, Any] = {
                    "backend": backend,
                    "dynamic": dynamic,
                    "first_call_s": round(compile_s, 1),
                    "ms_per_forward": round(ms, 1),
                    "tflops": round(flops / ms / 1e9, 1),
                    "rel_err_vs_native": round(rel, 5),
                }
                if dynamic:
                    # Another text length and image size must not recompile.
                    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :-7]
                    t2 = time.perf_counter()
                    forward()
                    sync()
                    entry["other_text_length_call_s"] = round(time.perf_counter() - t2, 2)
                    if args.profile:
                        entry["top_kernels_ms"] = top_kernels(forward)
                    inputs["encoder_hidden_states"] = torch.cat(
                        [inputs["encoder_hidden_states"], inputs["encoder_hidden_states"][:, :7]],
                        dim=1,
                    )
            except Exception as exc:
                entry = {"backend": backend, "dynamic": dynamic, "error": str(exc)[:500]}
            results["compiled"][label] = entry
            print(f"compiled {label}: {entry}", flush=True)
    if args.fp8 or args.only_fp8:
        results["fp8"] = fp8_section(transformer, forward, timed, reference, flops, best, args)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def fp8_section(
    transformer: Any, forward: Any, timed: Any, reference: Any, flops: float, backend: str,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """FP8 linears (what `model.quantization: fp8` does): eager, then compiled; each output's
    relative L2 error against the bf16 eager output of the same inputs."""
    import torch
    import torch._dynamo

    from serve_app.pipeline.speed.quantization import quantize_transformer

    out: dict[str, Any] = {}
    torch._dynamo.reset()
    for block in transformer.transformer_blocks:  # back to eager after the compiled runs
        block._compiled_call_impl = None
    transformer.set_attention_backend(backend)
    t0 = time.perf_counter()
    report = quantize_transformer(transformer, "fp8")
    torch.cuda.synchronize()
    assert report is not None
    out["quantize_s"] = round(time.perf_counter() - t0, 2)
    out["layers"] = report.layers
    out["linear_weights_gib"] = [
        round(report.bytes_before / 2**30, 2), round(report.bytes_after / 2**30, 2)
    ]  # fmt: skip
    out["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    from serve_app.pipeline.speed import rope

    variants = (
        ("eager", False, False, False),
        ("compiled_dynamic_complex_rope", True, False, False),
        ("compiled_dynamic", True, True, False),
        ("compiled_dynamic_cd_tuning", True, True, True),
    )
    for label, compiled, real_rope, tuning in variants:
        if args.quick_fp8 and label != "compiled_dynamic":
            continue
        try:
            if real_rope:
                rope.install_real_rope()
            else:
                rope.uninstall_real_rope()
            # inductor's coordinate-descent tuning of the generated kernels (what torchao's
            # set_inductor_config would switch on): slower compile, maybe faster kernels.
            torch._inductor.config.coordinate_descent_tuning = tuning
            if compiled:
                torch._dynamo.reset()
                transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
                t1 = time.perf_counter()
                forward()
                torch.cuda.synchronize()
                first = round(time.perf_counter() - t1, 1)
            ms, result = timed(args.repeats)
            rel = float((result.float() - reference).norm() / reference.norm())
            entry: dict[str, Any] = {
                "backend": backend,
                "ms_per_forward": round(ms, 1),
                "tflops": round(flops / ms / 1e9, 1),
                "rel_err_vs_bf16": round(rel, 5),
                "finite": bool(torch.isfinite(result).all()),
            }
            if compiled:
                entry["first_call_s"] = first
            if args.profile and compiled:
                entry["top_kernels_ms"] = top_kernels(forward)
        except Exception as exc:
            entry = {"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:800]}
        out[label] = entry
        print(f"fp8 {label}: {entry}", flush=True)
    return out


def top_kernels(forward: Any, *, top: int = 12) -> dict[str, float]:
    """CUDA time per kernel name over one forward (ms), the largest `top`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    table = {r.key[:90]: round(r.device_time_total / 1000, 2) for r in events[:top]}
    table["(all kernels)"] = round(sum(e.device_time_total for e in events) / 1000, 2)
    print("top kernels (ms per forward):", json.dumps(table, indent=1), flush=True)
    return table


if __name__ == "__main__":
    sys.exit(main())
