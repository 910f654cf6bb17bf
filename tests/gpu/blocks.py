"""Full-width transformer blocks on the GPU and their inputs, for the GPU tests of the forward's
rewrites (each compared with diffusers' form and a float32 reference)."""

from __future__ import annotations

from typing import Any


def rel(a: Any, b: Any) -> float:
    """Relative L2 difference of `a` from `b`, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def full_width_blocks(layers: int = 4) -> Any:
    """The synthetic 2511 transformer on cuda:0 in bf16: full width, `layers` of the 60 blocks."""
    import torch

    from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir

    torch.manual_seed(0)
    return build_component(
        variant_dir("2511"), "transformer", device_map={"": 0}, dtype=torch.bfloat16,
        overrides={"num_layers": layers},
    )  # fmt: skip


def block_inputs(*, side: int = 64, text: int = 219) -> dict[str, Any]:
    """float32 inputs of the standard edit's shape (a side x side output and one reference of
    that size, `text` prompt tokens), without the timestep."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 2 * side * side, 64, device="cuda", generator=gen),
        "encoder_hidden_states": torch.randn(1, text, 3584, device="cuda", generator=gen),
        "encoder_hidden_states_mask": None,
        "img_shapes": [[(1, side, side), (1, side, side)]],
        "return_dict": False,
    }


def bf16(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.bfloat16() if hasattr(v, "bfloat16") else v for k, v in inputs.items()}
