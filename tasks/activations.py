"""Activations quantized as the serving engine quantizes them, so validate judges the model users will serve.

A source (an output read back from its file) may say, per Linear, how the runtime quantizes that Linear's input;
validate then rounds the input the same way before the Linear runs (quantize, then dequantize, in float32).
Each scheme follows compressed-tensors' own arithmetic (``compute_dynamic_scales_and_zp``, ``_quantize``,
``_dequantize``), which is what transformers runs for these checkpoints; vLLM's CUDA kernel multiplies by
the reciprocal scale and floors it at 1 / (448 * 512), which can move a code by one on rare ties; its int8
kernel scales by absmax / 127 where compressed-tensors divides by half the int8 range, 127.5.
"""

from __future__ import annotations

from typing import Callable

from quantfab.tasks.lazy import lazy

torch = lazy("torch")

E4M3_MAX = 448.0
INT8_HALF_RANGE = 127.5


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 per token: each token's scale is its absmax / 448 (0 becomes float32 eps), x / scale is
    clamped to ±448 and rounded to E4M3, then multiplied back by the scale."""
    scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = torch.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric INT8 per token: each token's scale is its absmax / 127.5 (half of int8's range 255; 0
    becomes float32 eps), x / scale is clamped to [-128, 127] and rounded half to even, then multiplied back."""
    scale = x.abs().amax(dim=-1, keepdim=True) / INT8_HALF_RANGE
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return torch.round(torch.clamp(x / scale, -128, 127)) * scale


SCHEMES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "fp8-token": (fp8_per_token, "inputs of the quantized Linears as FP8 E4M3, a dynamic scale per token"),
    "int8-token": (int8_per_token, "inputs of the quantized Linears as INT8, a dynamic symmetric scale per token"),
}


def simulate_inputs(layer: torch.nn.Module, schemes: dict[str, str]) -> None:
    """Quantize the input of each named submodule (relative to ``layer``) by its scheme before it runs."""
    for name, scheme in schemes.items():
        rule = SCHEMES[scheme][0]
        layer.get_submodule(name).register_forward_pre_hook(lambda _module, args, rule=rule: (rule(args[0]), *args[1:]))
