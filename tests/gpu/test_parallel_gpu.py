"""One replica over 2 GPUs as ranks (one process per GPU, `model.parallel`), through the real Serve
app with the synthetic full-size model: CFG 2 and Ulysses 2 each give the one-GPU edit's pixels
within bf16 tolerance, and so do 4 and 8 ranks (CFG 2 x Ulysses 2 or 4) on hosts with the GPUs; a
rank killed mid-edit costs one 503; one rank out of memory costs one 500 and nothing else.
Eager (no compile), 4 steps, 1024x1024 with one 1024x1024 reference.

`python -m pytest tests/gpu/test_parallel_gpu.py -v -s -rA` on a machine with 2+ GPUs.
"""

from __future__ import annotations

import contextlib
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
        serve_url, Scenario(name="ulysses2", gpus=1, ranks=2, cfg="1")
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


@pytest.mark.parametrize(
    ("ranks", "ulysses"), [pytest.param(4, 2, marks=pytest.mark.gpus(4)),
                           pytest.param(8, 4, marks=pytest.mark.gpus(8))],
)  # fmt: skip
def test_cfg2_times_ulysses_matches_one_gpu(serve_url: str, ranks: int, ulysses: int) -> None:
    from bench.run import Scenario, relative_error

    one, _, denoise_one = _edit(serve_url, Scenario(name="one-gpu", gpus=1))
    many, ready, denoise = _edit(serve_url, Scenario(name=f"ranks{ranks}", gpus=1, ranks=ranks))
    assert (ready["parallel"]["cfg"], ready["parallel"]["ulysses"]) == (2, ulysses)
    assert len({tuple(r["gpus"]) for r in ready["parallel"]["ranks"]}) == ranks
    err = relative_error(many, one)
    print(f"\n{ranks} ranks (CFG 2 x Ulysses {ulysses}): pixels vs one GPU rel L2 {err:.5f};"
          f" denoise ms {denoise:.0f} vs {denoise_one:.0f}", flush=True)  # fmt: skip
    assert err < 0.05
    assert denoise < 0.5 * denoise_one, "the ranks did not share the work"


@pytest.mark.gpus(2)
def test_a_rank_killed_mid_edit_answers_503_then_the_replica_is_replaced(serve_url: str) -> None:
    """NCCL on real GPUs: rank 1 dies while rank 0 waits in a collective. The edit in flight gets
    the 503 JSON within seconds (not the collective's timeout), Serve replaces the whole group,
    and the next edit works."""
    import threading
    import time

    import httpx
    import ray
    from ray import serve

    from bench.run import APP, PROMPT, SIZE, Scenario, deploy, edit_http, reference_png

    deploy(Scenario(name="cfg2-kill", gpus=1, ranks=2), serve_url, steps=STEPS, timeout_s=500)
    try:
        png = reference_png()
        edit_http(serve_url, png, steps=2, seed=1)  # warm
        answer: dict[str, Any] = {}

        def long_edit() -> None:
            data = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "num_inference_steps": "60"}
            files = [("image", ("in.png", png, "image/png"))]
            resp = httpx.post(f"{serve_url}/v1/images/edits", data=data, files=files, timeout=600)
            answer.update(status=resp.status_code, body=resp.json(), at=time.monotonic())

        worker = threading.Thread(target=long_edit)
        worker.start()
        time.sleep(8)  # well into the denoising loop
        (rank1,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("qwen-rank-")]  # fmt: skip
        killed = time.monotonic()
        ray.kill(ray.get_actor(rank1["name"], namespace=rank1["namespace"]))
        worker.join(timeout=300)
        assert not worker.is_alive(), "the edit in flight hung after its rank died"
        waited = answer["at"] - killed
        print(f"\nkilled rank 1 mid-edit: HTTP {answer['status']} after {waited:.1f} s:"
              f" {answer['body']}", flush=True)  # fmt: skip
        assert answer["status"] == 503 and answer["body"]["error"]["code"] == "replica_unavailable"
        assert waited < 60
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            fresh = [n for n in names if n.startswith("qwen-rank-") and n != rank1["name"]]
            with contextlib.suppress(httpx.HTTPError):
                if fresh and httpx.get(f"{serve_url}/ready", timeout=10).is_success:
                    break
            time.sleep(2)
        else:
            pytest.fail("the replica was not replaced within 400 s")
        replaced = time.monotonic() - killed
        edit = edit_http(serve_url, png, steps=STEPS, seed=7)
        print(f"replaced and serving {replaced:.0f} s after the kill; next edit"
              f" {edit.seconds:.2f} s", flush=True)  # fmt: skip
    finally:
        serve.delete(APP)


@pytest.mark.gpus(2)
def test_one_rank_out_of_memory_is_answered_and_the_replica_keeps_serving(serve_url: str) -> None:
    """A real CUDA out-of-memory error on rank 1 alone (its next forward asks the allocator for
    1 PiB) while rank 0's forward succeeds: the edit gets the 500 `gpu_out_of_memory` JSON at that
    step's end, every rank frees its memory, and the same ranks serve the next edit."""
    import time

    import httpx
    import ray
    from ray import serve

    from bench.run import APP, PROMPT, SIZE, Scenario, deploy, edit_http, reference_png

    deploy(Scenario(name="cfg2-oom", gpus=1, ranks=2), serve_url, steps=STEPS, timeout_s=500)
    try:
        png = reference_png()
        edit_http(serve_url, png, steps=2, seed=1)  # warm
        (rank1,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("qwen-rank-")]  # fmt: skip
        actor = ray.get_actor(rank1["name"], namespace=rank1["namespace"])

        def fail_next_forward(worker: Any) -> None:
            import torch

            inner = worker._rank.runner.pipe.transformer.inner

            def forward(*args: Any, **kwargs: Any) -> Any:
                del inner.forward  # once
                torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # raises the real OOM
                raise AssertionError("1 PiB fitted")

            inner.forward = forward

        ray.get(actor.__ray_call__.remote(fail_next_forward))
        data = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "num_inference_steps": str(STEPS)}
        files = [("image", ("in.png", png, "image/png"))]
        t0 = time.monotonic()
        resp = httpx.post(f"{serve_url}/v1/images/edits", data=data, files=files, timeout=300)
        waited = time.monotonic() - t0
        print(f"\nrank 1 out of memory: HTTP {resp.status_code} after {waited:.1f} s:"
              f" {resp.text[:300]}", flush=True)  # fmt: skip
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "gpu_out_of_memory"
        edit = edit_http(serve_url, png, steps=STEPS, seed=7)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        print(f"next edit {edit.seconds:.2f} s; rank actors {names}", flush=True)
        assert rank1["name"] in names  # the same ranks: nothing was replaced
    finally:
        serve.delete(APP)
