"""Serving overhead of one edit: HTTP end to end minus the bare pipeline, stage by stage, on CPU.

    python -m bench.overhead [--runs 10] [--steps 2] [--size 1024] [--reference smooth|photo]
                             [--skip-micro] [--json out.json]

It starts the real app (`serve_app.app:build_app`, Ray Serve's HTTP proxy) with the embedded tiny
model on CPU (random weights: a 1024x1024 edit takes seconds, and its output is noise),
then sends `runs` sequential 1024x1024 edits (n=1, png, b64_json) of one `size`x`size` reference
PNG: `smooth` is examples/input.png scaled up (as bench/run.py's reference, ~30 KB), `photo`
adds photo-like texture and grain (~2 MB, as a real photo upload).

Per edit it reads the `Server-Timing` header of the answer and splits HTTP - pipeline into:
outside the ingress (client, network, Serve's proxy), multipart parse, PNG decode, the handle round
trip beyond the replica (Ray transfer both ways), queue, the replica outside the pipeline, encode
(PNG), body (base64 + JSON) and the rest of the ingress. Medians over the runs.

Unless --skip-micro, it first times the image codecs in this process on 1 MP images: encode of a
noise image (what the tiny model returns), of a photo-like one and of a smooth one (real outputs
lie between the last two), base64 (the stdlib's, and the ingress's spliced body), and decode of
the upload (the ingress's, and Pillow's alone): first with glibc's default malloc
(`micro_default_malloc` in the JSON), then as the ingress runs them, after
`serve_app.common.malloc.keep_large_buffers()` (`micro`). `--json` writes everything, e.g.
bench/results/cpu-tiny-overhead.json (the example header in docs/api.md).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import cluster_runtime_env, free_port, post_edit, serve_ingress, versions
from serve_app.common.timing import parse_server_timing

APP = "qwen-image-edit"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "input.png"


# ---------------------------------------------------------------------------------------
# Images


def smooth_image(size: int) -> np.ndarray:
    """examples/input.png scaled to size x size (gradients and flat areas: compresses ~100x)."""
    from PIL import Image

    image = Image.open(EXAMPLE).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def photo_image(size: int, seed: int = 0) -> np.ndarray:
    """The smooth image plus blurred texture and fine grain: a PNG about as large as a photo's."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    base = smooth_image(size).astype(np.float32)
    coarse = rng.normal(0.0, 1.0, (size // 8, size // 8, 3)).astype(np.float32)
    texture = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c]).resize((size, size), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ],
        axis=-1,
    )
    grain = rng.normal(0.0, 1.0, (size, size, 3)).astype(np.float32)
    detail = np.asarray(
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(1.5)
        ),
        dtype=np.float32,
    )
    image = base + 12.0 * texture + 3.0 * grain + 0.6 * (detail - detail.mean())[..., None]
    return np.asarray(image.round().clip(0, 255), dtype=np.uint8)


def noise_image(size: int, seed: int = 0) -> np.ndarray:
    """Uniform noise, as the tiny model's outputs: the worst case for PNG."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """A client's upload: Pillow's default PNG settings."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# In-process micro-benchmark of the codecs


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm caches and lazy imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def _b64_body(encoded: bytes) -> bytes:
    from serve_app.ingress.responses import Base64Splice

    splice = Base64Splice()
    return splice.fill(json.dumps({"b64_json": splice.add(encoded)}).encode())


def _pillow_decode(upload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(upload)) as img:
        return np.asarray(img.convert("RGB"))


def micro(size: int, repeat: int = 7) -> dict[str, Any]:
    from serve_app.ingress.imaging import decode_image, encode_image

    out: dict[str, Any] = {}
    for kind, make in (("noise", noise_image), ("photo", photo_image), ("smooth", smooth_image)):
        array = make(size)
        encoded = encode_image(array, output_format="png", compression=None)
        upload = png_bytes(array)
        out[kind] = {
            "png_encode_ms": _median_ms(
                lambda a=array: encode_image(a, output_format="png", compression=None), repeat
            ),
            "png_bytes": len(encoded),
            "base64_ms": _median_ms(lambda e=encoded: base64.b64encode(e).decode("ascii"), repeat),
            # What the ingress does instead (responses.Base64Splice): pybase64 bytes, spliced.
            "b64_body_ms": _median_ms(lambda e=encoded: _b64_body(e), repeat),
            "upload_png_bytes": len(upload),
            "png_decode_ms": _median_ms(
                lambda u=upload: decode_image(u, param="image", max_pixels=size * size), repeat
            ),
            "png_decode_pillow_ms": _median_ms(lambda u=upload: _pillow_decode(u), repeat),
        }
    return out


def micro_both_mallocs(size: int) -> dict[str, dict[str, Any]]:
    """`micro` with glibc's default malloc, then after keep_large_buffers() (as the ingress and
    the replica run; it cannot be undone in this process, so the default goes first)."""
    from serve_app.common.malloc import keep_large_buffers

    default = micro(size)
    if not keep_large_buffers():
        print("malloc: not glibc's; both tables use the default", file=sys.stderr)
    return {"default malloc": default, "kept buffers (as served)": micro(size)}


# ---------------------------------------------------------------------------------------
# The app over HTTP


def app_args(size: int, steps: int) -> dict[str, Any]:
    return {
        "model": {"source": "tiny", "device_map": "cpu", "dtype": "float32"},
        "generation": {"default_steps": steps, "max_steps": max(steps, 8)},
        "limits": {"max_output_side": max(size, 1024), "max_n": 1},
    }


def start(size: int, steps: int) -> str:
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=cluster_runtime_env()
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(size, steps)), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def edit_once(client: Any, url: str, png: bytes, *, size: int, seed: int) -> dict[str, float]:
    """One edit; seconds per stage, `http` being the client's view (send to last byte)."""
    data = {"model": "qwen-image-edit", "prompt": "make the sky purple", "size": f"{size}x{size}"}
    data["seed"] = str(seed)
    resp, _, http = post_edit(client, url, png, data, tag="ovh")
    t1 = time.perf_counter()
    image = base64.b64decode(resp.json()["data"][0]["b64_json"])
    client_parse = time.perf_counter() - t1
    # The app started above always answers with Server-Timing.
    stages = {k: v / 1000 for k, v in parse_server_timing(resp.headers["server-timing"]).items()}
    return {
        **stages,
        "http": http,
        "client_parse": client_parse,
        "response_bytes": len(resp.content),
        "png_bytes": len(image),
    }


def breakdown(run: dict[str, float]) -> dict[str, float]:
    """HTTP - pipeline, split into stages that add up to it (seconds)."""
    http, pipeline = run["http"], run["pipeline"]
    parts: dict[str, float] = {"pipeline": pipeline, "overhead": http - pipeline}
    if "total" not in run:
        return parts
    total, model, replica = run["total"], run["model"], run["replica"]
    queue = run.get("queue", 0.0)
    ingress_known = ("parse", "decode", "model", "encode", "body")
    parts.update(
        {
            "outside_ingress": http - total,
            "parse": run.get("parse", 0.0),
            "decode": run.get("decode", 0.0),
            "handle_transfer": model - replica - queue,
            "queue": queue,
            "replica_outside_pipeline": replica - pipeline,
            "encode": run.get("encode", 0.0),
            "body": run.get("body", 0.0),
            "ingress_other": total - sum(run.get(k, 0.0) for k in ingress_known),
        }
    )
    return parts


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def report(
    runs: list[dict[str, float]], parts: dict[str, float], micro_out: dict[str, Any] | None
) -> None:
    for title, table in (micro_out or {}).items():
        print(f"\ncodecs in-process, 1 image, {title} (median ms):")
        print(
            "  image   png encode  png bytes  base64  b64 body  upload bytes  upload decode"
            "  (Pillow)"
        )
        for kind, m in table.items():
            print(
                f"  {kind:7s} {m['png_encode_ms']:10.1f} {m['png_bytes']:10d} {m['base64_ms']:7.1f}"
                f" {m['b64_body_ms']:9.1f} {m['upload_png_bytes']:13d} {m['png_decode_ms']:14.1f}"
                f"  {m['png_decode_pillow_ms']:8.1f}"
            )
    med = median_of(runs)
    http, pipeline = med["http"], med["pipeline"]
    print(f"\n{len(runs)} edits: median HTTP {1000 * http:.1f} ms, bare pipeline "
          f"{1000 * pipeline:.1f} ms, response {med['response_bytes'] / 1e6:.2f} MB")  # fmt: skip
    print("overhead breakdown (medians per stage, ms; they need not sum exactly):")
    for name, seconds in parts.items():
        if name != "pipeline":
            print(f"  {name:26s} {1000 * seconds:8.1f}")
    print(f"  {'client json+b64 decode':26s} {1000 * med['client_parse']:8.1f}  (not in HTTP)")
    for base in (12.0, 24.0):
        print(f"  overhead vs a {base:.0f} s edit: {100 * parts['overhead'] / base:.2f} %")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="output and reference side")
    parser.add_argument("--reference", choices=("smooth", "photo"), default="smooth")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from ray import serve

    micro_out = None if args.skip_micro else micro_both_mallocs(args.size)
    reference = (photo_image if args.reference == "photo" else smooth_image)(args.size)
    png = png_bytes(reference)
    url = start(args.size, args.steps)
    try:
        with httpx.Client(timeout=600) as client:
            for seed in range(2):  # warm-up: first-call imports, connection, caches
                edit_once(client, url, png, size=args.size, seed=seed)
            runs = [
                edit_once(client, url, png, size=args.size, seed=100 + i) for i in range(args.runs)
            ]
    finally:
        serve.shutdown()
        ray.shutdown()
    per_run = [breakdown(r) for r in runs]
    parts = median_of(per_run)
    report(runs, parts, micro_out)
    if args.json:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "serve_ingress": serve_ingress(),
            "cluster_env": cluster_runtime_env()["env_vars"],
            "reference": args.reference,
            "upload_bytes": len(png),
            "runs": runs,
            "median_s": median_of(runs),
            "breakdown_median_s": parts,
            "micro": micro_out["kept buffers (as served)"] if micro_out else None,
            "micro_default_malloc": micro_out["default malloc"] if micro_out else None,
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
