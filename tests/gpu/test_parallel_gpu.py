"""One replica over 2 GPUs as ranks (one process per GPU, `model.parallel`), through the real Serve
app with the synthetic full-size model: CFG 2 and Ulysses 2 each give the one-GPU edit's pixels
within bf16 tolerance. Eager (no compile), 4 steps, 1024x1024 with one 1024x1024 reference.

`python -m pytest tests/gpu/test_parallel_gpu.py -v -s -rA` on a machine with 2+ GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures import free_port

pytestmark = pytest.mark.gpu

STEPS = 4


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    import ray
    from ray import serve

    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _edit(url: str, scenario: Any) -> tuple[bytes, dict[str, Any], float]:
    from ray import serve

    from bench.run import APP, deploy, edit_http, reference_png

    ready = deploy(scenario, url, steps=STEPS, timeout_s=500)
    try:
        edit_http(url, reference_png(), steps=2, seed=1)  # warm-up (kernels, caches)
        edit = edit_http(url, reference_png(), steps=STEPS, seed=7)
        print(f"\n[{scenario.name}] {edit.seconds:.2f} s over HTTP; /ready parallel:"
              f" {ready.get('parallel')}", flush=True)  # fmt: skip
        return edit.image, ready, edit.server_timing_ms.get("denoise", 0.0)
    finally:
        serve.delete(APP)


@pytest.mark.gpus(2)
def test_cfg2_and_ulysses2_match_one_gpu(serve_url: str) -> None:
    from bench.run import Scenario, relative_error

    one, _, denoise_one = _edit(serve_url, Scenario(name="one-gpu", gpus=1))
    cfg2, ready_cfg, denoise_cfg = _edit(serve_url, Scenario(name="cfg2", gpus=1, ranks=2))
    uly2, ready_uly, denoise_uly = _edit(
        serve_url, Scenario(name="ulysses2", gpus=1, ranks=2, pcfg="1")
    )
    assert (ready_cfg["parallel"]["cfg"], ready_cfg["parallel"]["ulysses"]) == (2, 1)
    assert (ready_uly["parallel"]["cfg"], ready_uly["parallel"]["ulysses"]) == (1, 2)
    gpus = {tuple(r["gpus"]) for r in ready_cfg["parallel"]["ranks"]}
    assert len(gpus) == 2, f"both ranks on one GPU: {ready_cfg['parallel']['ranks']}"
    err_cfg, err_uly = relative_error(cfg2, one), relative_error(uly2, one)
    print(
        f"\npixels vs one GPU: CFG 2 rel L2 {err_cfg:.5f}, Ulysses 2 rel L2 {err_uly:.5f};"
        f" denoise ms one GPU {denoise_one:.0f}, CFG 2 {denoise_cfg:.0f}, Ulysses 2"
        f" {denoise_uly:.0f}",
        flush=True,
    )
    # CFG 2 computes each branch exactly as one GPU does; Ulysses reorders attention sums (bf16).
    assert err_cfg < 0.01
    assert err_uly < 0.05
    assert denoise_cfg < 0.75 * denoise_one, "the CFG branches did not run at the same time"
