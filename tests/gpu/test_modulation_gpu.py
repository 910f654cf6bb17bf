"""Modulation tables (`pipeline.speed.modulation`) on a CUDA GPU: the compiled bf16 blocks reading their
modulation from tables made for a whole schedule stay as close to a float32 forward as the
per-forward products, for every step of the schedule, and compute no modulation product per
forward.

Skipped without CUDA (conftest): `python -m pytest tests/gpu/test_modulation_gpu.py -v -s`.
"""

from __future__ import annotations

import copy

import pytest

from tests.gpu.blocks import bf16, block_inputs, full_width_blocks, rel

pytestmark = pytest.mark.gpu


@pytest.mark.gpus(1)
def test_compiled_blocks_with_tables_stay_close_at_every_step() -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from serve_app.pipeline.random_weights.synthetic import variant_dir
    from serve_app.pipeline.speed.modulation import (
        install_modulation_tables,
        uninstall_modulation_tables,
    )

    transformer = full_width_blocks(4)
    reference = copy.deepcopy(transformer).float()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(variant_dir("2511") / "scheduler")
    scheduler.set_timesteps(50, mu=1.15, device="cuda")  # the standard edit's schedule
    args = block_inputs()
    bf16_args = bf16(args)
    steps = [0, 1, 25, 49]
    # As the pipeline passes them: `t.expand(batch).to(latents.dtype) / 1000`.
    timesteps = [scheduler.timesteps[i].expand(1).to(torch.bfloat16) / 1000 for i in steps]
    calls = [0]
    linear = transformer.transformer_blocks[0].img_mod[1]
    linear.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with torch.inference_mode():
        exact = [reference(**args, timestep=t.float())[0] for t in timesteps]
        del reference
        for t in timesteps:  # eager: the hook sees every call
            transformer(**bf16_args, timestep=t)
        assert calls[0] == len(steps)
        tables = install_modulation_tables(transformer, lambda: scheduler.timesteps)
        assert tables is not None
        for t in timesteps:
            transformer(**bf16_args, timestep=t)
        assert calls[0] == len(steps) + 1  # one product, for the whole schedule
        assert tables.active
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        tabled = [transformer(**bf16_args, timestep=t)[0] for t in timesteps]
        assert uninstall_modulation_tables(transformer)
        plain = [transformer(**bf16_args, timestep=t)[0] for t in timesteps]  # recompiles
    for step, p, t, e in zip(steps, plain, tabled, exact, strict=True):
        print(
            f"step {step}: vs float32 per forward {rel(p, e):.4f}, tables {rel(t, e):.4f};"
            f" between them {rel(t, p):.4f}"
        )
        assert rel(t, e) <= rel(p, e) * 1.1
        assert rel(t, p) < 0.02
