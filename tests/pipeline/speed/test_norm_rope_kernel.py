"""The joint QK-norm + RoPE Triton kernel (`pipeline.norm_rope_kernel`) in Triton's interpreter on
CPU, against the PyTorch operations it replaces (`joint_qk`); on a GPU: tests/gpu/test_joint_qk_gpu.py.

The interpreter is chosen when a kernel is defined, from TRITON_INTERPRET; Triton reads it once
per process, so the comparison runs in a child process. The interpreter converts float32 to
bfloat16 by truncation (a GPU rounds to nearest), so in bf16 the values agree to a bf16 step;
in float32 to float32 rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_app.pipeline.speed.norm_rope_kernel import fits

pytest.importorskip("triton", reason="Triton comes with torch's Linux wheels; absent here")

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from diffusers.models.normalization import RMSNorm
from serve_app.pipeline.speed import joint_qk, norm_rope_kernel

kernel = norm_rope_kernel.make_kernel()
results = {"interpreted": type(kernel).__name__}
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for batch, lengths in ((1, (7, 40)), (2, (40, 7))):
        heads, dim = 3, 32
        # Views with row strides, as the projections' `unflatten` makes them; the second a
        # slice of a longer sequence, as a Ulysses rank's share is.
        first = torch.randn(batch, lengths[0], heads * dim, generator=g).to(dtype)
        longer = torch.randn(batch, lengths[1] + 5, heads * dim, generator=g).to(dtype)
        first = first.unflatten(-1, (-1, dim))
        second = longer[:, 5:].unflatten(-1, (-1, dim))
        norms = [RMSNorm(dim, eps=1e-6).to(dtype) for _ in range(2)]
        with torch.no_grad():
            for norm in norms:
                norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
        freqs = [torch.polar(torch.ones(n, dim // 2), torch.randn(n, dim // 2, generator=g))
                 for n in lengths]
        real = tuple(torch.view_as_real(f) for f in freqs)
        with torch.no_grad():
            want = joint_qk._joined(first, second, *norms, *freqs)
            weights = (norms[0].weight, norms[1].weight)
            got = norm_rope_kernel.launch(kernel, first, second, weights, real, eps=1e-6)
            # The registered op (what the compiled blocks call), eagerly: the same launches.
            op = norm_rope_kernel.joint_norm_rope_op()(first, second, *weights, *real, 1e-6)
        key = f"{str(dtype).split('.')[-1]}/b{batch}/{lengths[0]}+{lengths[1]}"
        results[key] = {
            "shape": list(got.shape), "want_shape": list(want.shape),
            "dtype": str(got.dtype), "max_abs": float((got.float() - want.float()).abs().max()),
            "max_want": float(want.float().abs().max()),
            "rel_l2": float((got.double() - want.double()).norm() / want.double().norm()),
            "fits": norm_rope_kernel.fits(first, second, *real),
            "op_equal": bool(torch.equal(op, got)),
        }
print(json.dumps(results))
"""


def test_interpreted_kernel_gives_the_pytorch_values() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("interpreted") == "InterpretedFunction"
    assert len(results) == 4
    print(json.dumps(results, indent=1))
    for key, r in results.items():
        assert r["fits"] and r["op_equal"], key
        assert r["shape"] == r["want_shape"] and r["dtype"].endswith(key.split("/")[0]), key
        if key.startswith("float32"):  # rounding only
            assert r["max_abs"] <= 1e-5 and r["rel_l2"] < 1e-6, (key, r)
        else:  # three truncations: a few bf16 steps (2**-8 relative) at most
            assert r["max_abs"] <= 4 * 2**-7 * r["max_want"] and r["rel_l2"] < 2**-6, (key, r)


def _streams(**changes: object) -> tuple[torch.Tensor, ...]:
    first = torch.zeros(1, 7, 3, 32)
    second = torch.zeros(1, 40, 3, 32)
    f1, f2 = torch.zeros(7, 16, 2), torch.zeros(40, 16, 2)
    values = {"first": first, "second": second, "f1": f1, "f2": f2, **changes}
    return tuple(values[k] for k in ("first", "second", "f1", "f2"))  # type: ignore[misc]


def test_fits_what_the_kernel_takes() -> None:
    assert fits(*_streams())
    assert fits(*_streams(second=torch.zeros(1, 64, 3 * 32)[:, 10:50].unflatten(-1, (-1, 32))))
    assert not fits(*_streams(second=torch.zeros(2, 40, 3, 32)))  # another batch
    assert not fits(*_streams(second=torch.zeros(1, 40, 4, 32)))  # other heads
    assert not fits(*_streams(second=torch.zeros(1, 40, 3, 32, dtype=torch.bfloat16)))
    assert not fits(*_streams(first=torch.zeros(1, 7, 3, 24), second=torch.zeros(1, 40, 3, 24),
                              f1=torch.zeros(7, 12, 2), f2=torch.zeros(40, 12, 2)))  # fmt: skip
    assert not fits(*_streams(first=torch.zeros(1, 7, 32, 3).transpose(2, 3)))  # strided D
    assert not fits(*_streams(first=torch.zeros(1, 0, 3, 32), f1=torch.zeros(0, 16, 2)))
    assert not fits(*_streams(second=torch.zeros(1, 0, 3, 32), f2=torch.zeros(0, 16, 2)))
    assert not fits(*_streams(f2=torch.zeros(40, 16, 2, dtype=torch.float64)))
