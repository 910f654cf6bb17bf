"""bench.plot: the speed figures from the results folder, and robustness to what lies there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import plot

pytest.importorskip(
    "matplotlib", reason="matplotlib is the bench extra (installed by make install)"
)


def _check_png(path: Path, *, min_size: tuple[int, int]) -> None:
    assert path.stat().st_size > 20_000, f"{path} is suspiciously small"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    # A drawn figure, not a blank canvas: many pixels differ from the background.
    assert (pixels < 200).mean() > 0.02


def test_the_figures_are_drawn_from_the_shipped_results(tmp_path: Path) -> None:
    assert plot.main(["--out", str(tmp_path)]) == 0
    _check_png(tmp_path / "latency.png", min_size=(900, 600))
    _check_png(tmp_path / "stages.png", min_size=(900, 500))


def test_unknown_and_future_result_files_do_not_break_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(plot.RESULTS, results)
    (results / "garbage.json").write_text("{not json")
    (results / "list.json").write_text("[1, 2]")
    (results / "other-job.json").write_text(
        json.dumps({"gpus_per_replica": 1, "latency_s_median": 3.0, "size": "512x512", "steps": 8})
    )
    # What a multi-GPU result may look like: more GPUs, parallel degrees, keys never seen here.
    future = {
        "name": "h200-4gpu-ulysses-fp8",
        "gpus_per_replica": 4,
        "quantization": "fp8",
        "ulysses_degree": 2,
        "cfg_degree": 2,
        "gpu": "NVIDIA H200",
        "size": "1024x1024",
        "steps": 50,
        "true_cfg": True,
        "latency_s_median": 8.5,
        "server_timing_ms_median": {"total": 8500.0, "pipeline": 8400.0, "denoise": 8200.0},
    }
    (results / "h200-4gpu-ulysses-fp8.json").write_text(json.dumps(future))

    runs, skipped = plot.load_runs(results)
    reasons = dict(skipped)
    assert reasons["garbage.json"].startswith("unreadable")
    assert reasons["list.json"] == "not a JSON object"
    assert "another job" in reasons["other-job.json"]
    assert "no end-to-end latency" in reasons["h100-forward.json"]
    # The removed cfg_parallel mode's results stay in the folder, out of the figure.
    assert reasons["h100-2gpu-cfg-compile.json"] == (
        "a mode this server no longer has: cfg_parallel"
    )
    assert not any(r.mode.startswith("cfg_parallel") for r in runs)
    series = plot.best_per_gpus(runs)
    assert series[("fp8", "H200")][4].seconds == 8.5
    # The fp8 H100 point per GPU count is the fastest of its runs of one replica with the shipped
    # switches: a throughput run (4 replicas) and a cpp_wrapper run (off in the configs) are dots.
    h100 = [r for r in runs if r.precision == "fp8" and r.gpu_model == "H100" and r.gpus == 1]
    shipped = [r for r in h100 if r.shipped]
    assert len(shipped) > 1 and len(h100) > len(shipped)
    assert series[("fp8", "H100")][1].seconds == min(r.seconds for r in shipped)
    assert min(r.seconds for r in h100) < series[("fp8", "H100")][1].seconds
    label = series[("fp8", "H100")][1].label
    assert label == "25.361 s, H100 (h100-1gpu-fp8-x2host.json)"

    out = tmp_path / "figures"
    assert plot.main(["--results", str(results), "--out", str(out)]) == 0
    _check_png(out / "latency.png", min_size=(900, 600))
    # The stages figure takes the fastest result with Server-Timing: the future one here.
    assert plot.pick_stage_run(runs, None).name == "h200-4gpu-ulysses-fp8"  # type: ignore[union-attr]
    _check_png(out / "stages.png", min_size=(900, 400))


def test_no_results_is_an_error_not_a_crash(tmp_path: Path) -> None:
    assert plot.main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_every_peer_names_its_job_and_source() -> None:
    peers = plot.load_peers(plot.PEERS)
    assert len(peers) >= 4
    for peer in peers:
        assert peer.source and peer.job and peer.hardware
    assert any(not p.same_job for p in peers)
