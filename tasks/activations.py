"""Activations and the KV cache quantized as the serving engine quantizes them, so validate judges the model users
will serve; and the scales static schemes store, chosen from histograms of what the built layers see.

A source (an output read back from its file) may say, per Linear, how the runtime quantizes that Linear's input
(an ``InputQuant``: a scheme, and for a static one the scale stored beside the Linear); validate then rounds the
input the same way before the Linear runs (quantize, then dequantize, in float32). A source with an FP8 KV cache
routes each attention's keys and values through a stand-in for its cache that rounds them the same way.
Each scheme follows compressed-tensors' own arithmetic (``compute_dynamic_scales_and_zp``, ``_quantize``,
``_dequantize``), which is what transformers runs for these checkpoints; vLLM's CUDA kernel multiplies by
the reciprocal scale and floors it at 1 / (448 * 512), which can move a code by one on rare ties; its int8
kernel scales by absmax / 127 where compressed-tensors divides by half the int8 range, 127.5.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

from quantfab.tasks.errors import UserError
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

E4M3_MAX = 448.0
INT8_HALF_RANGE = 127.5
HALF_RANGE = {"fp8": E4M3_MAX, "int8": INT8_HALF_RANGE}  # what compressed-tensors divides a range by for a scale
# |x| histograms (of each input, or key and value, through the built layers): 16 bins per octave of log2 |x| over
# [-32, 32); beyond, the end bins
HIST_LOG2 = (-32, 32)
HIST_PER_OCTAVE = 16
HIST_BINS = (HIST_LOG2[1] - HIST_LOG2[0]) * HIST_PER_OCTAVE


@dataclass(frozen=True)
class MeasuredScales:
    """What an output stores from the calibration tokens carried through the layers as built: a static input
    scale per quantized Linear for activations of type ``inputs``, KV-cache scales per layer of type ``kv``."""

    inputs: str | None = None
    kv: str | None = None

    def __bool__(self) -> bool:
        return self.inputs is not None or self.kv is not None


@dataclass(frozen=True)
class InputQuant:
    """How the runtime quantizes one Linear's input: a ``SCHEMES`` name, and a static scheme's stored scale."""

    scheme: str
    scale: float | None = None


def fp8_per_token(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dynamic FP8 per token: each token's scale is its absmax / 448 (0 becomes float32 eps)."""
    d = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    return fp8_with(x, torch.where(d == 0, torch.finfo(d.dtype).eps, d))


def fp8_per_group128(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dynamic FP8 per token and group of 128 features (FP8_BLOCK's inputs): each group's scale is its absmax / 448."""
    return fp8_per_token(x.unflatten(-1, (-1, 128)), scale).flatten(-2)


def fp8_static(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Static FP8: one stored scale for every token (calibrated)."""
    return fp8_with(x, torch.tensor([scale], dtype=x.dtype))


def fp8_with(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale clamped to ±448 and rounded to E4M3, then multiplied back by the scale."""
    q = torch.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


def int8_per_token(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dynamic symmetric INT8 per token: each token's scale is its absmax / 127.5 (half of int8's range 255; 0
    becomes float32 eps)."""
    d = x.abs().amax(dim=-1, keepdim=True) / INT8_HALF_RANGE
    return int8_with(x, torch.where(d == 0, torch.finfo(d.dtype).eps, d))


def int8_static(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Static symmetric INT8: one stored scale for every token (calibrated)."""
    return int8_with(x, torch.tensor([scale], dtype=x.dtype))


def int8_with(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale clamped to [-128, 127] and rounded half to even, then multiplied back by the scale."""
    return torch.round(torch.clamp(x / scale, -128, 127)) * scale


def fp4_round(y: torch.Tensor) -> torch.Tensor:
    """y clamped to ±6 and rounded to the nearest E2M1 value, ties to the even code (compressed-tensors'
    cast_to_fp4; fp4_grids.e2m1_encode is its NumPy twin for weights)."""
    a = y.abs().clamp(max=6.0)
    v = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    return (v * torch.sign(y)).to(y.dtype)


def nvfp4_per_group16(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """NVFP4 inputs: per token and group of 16, an E4M3 scale (absmax / 6, relative to the stored global scale
    ``scale``; 0.125 where it is 0)."""
    g = torch.tensor(scale, dtype=torch.float32)
    groups = x.unflatten(-1, (-1, 16))
    stored = (groups.abs().amax(dim=-1, keepdim=True) / 6.0 * g).clamp(-E4M3_MAX, E4M3_MAX)
    stored = stored.to(torch.float8_e4m3fn).to(x.dtype)
    d = torch.where(stored == 0, 0.125, stored) / g
    return (fp4_round(groups / d) * d).flatten(-2)


def mxfp4_per_group32(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """MXFP4 inputs: per token and group of 32, a power-of-two scale (E8M0) from the group's absmax, as
    fp4_grids.mx_exponent chooses it."""
    groups = x.unflatten(-1, (-1, 32))
    absmax = groups.abs().amax(dim=-1, keepdim=True).float()
    power = ((absmax.view(torch.int32) + (1 << 21)) & -(1 << 23)).view(torch.float32)  # up from 1.75 x 2^k
    exponent = torch.round(torch.clamp(127 + torch.floor(torch.log2(power)) - 2, 0, 255))
    d = torch.exp2(exponent - 127).to(x.dtype)
    return (fp4_round(groups / d) * d).flatten(-2)


def fp4_global_scale(absmax: float) -> np.float32:
    """NVFP4's global scale (compressed-tensors' generate_gparam) of values, weights or inputs, whose largest
    magnitude is ``absmax``: 448 * 6 / absmax, so the largest block scale is E4M3's largest; 1 where it is 0."""
    if not absmax > 0:
        return np.float32(1.0)
    return np.float32(E4M3_MAX * 6.0) / np.float32(absmax)


def add_abs_histogram(hist: torch.Tensor, a: torch.Tensor) -> None:
    """Add |x| values ``a`` (rows x width) to ``hist`` (HIST_BINS float64 counts), a few million at a time."""
    for part in a.split(max(1, (1 << 22) // max(a.shape[-1], 1))):
        logs = torch.log2(part).clamp_(HIST_LOG2[0], HIST_LOG2[1] - 1e-3)  # 0 -> -inf -> the first bin
        hist += torch.histc(logs, HIST_BINS, HIST_LOG2[0], HIST_LOG2[1]).double()


def static_scale(hist: np.ndarray, x_max: float, kind: str) -> float:
    """The static input scale (float32) of activation type ``kind`` (fp8, int8) with the least squared error over
    the inputs ``hist`` counts: clipping at c (scale c / half range) trades saturating the values above c against
    rounding the rest more finely. c is tried at ``x_max`` and down to x_max / 1024 in steps of 1/16 octave; the
    error of each bin is its centre's, with rounding modelled as uniform within the step there."""
    if kind == "nvfp4":  # the global scale of the input: its largest magnitude, as static_minmax observes it
        return float(fp4_global_scale(x_max))
    if x_max <= 0:  # an input that was always 0: compressed-tensors' observer gives float32 eps
        return float(np.finfo(np.float32).eps)
    centre = 2.0 ** (HIST_LOG2[0] + (np.arange(HIST_BINS) + 0.5) / HIST_PER_OCTAVE)
    clips = x_max * 2.0 ** (-np.arange(0, 10 * HIST_PER_OCTAVE + 1) / HIST_PER_OCTAVE)
    errors = [float(hist @ _squared_error(centre, c / HALF_RANGE[kind], kind)) for c in clips]
    scale = np.float32(clips[int(np.argmin(errors))]) / np.float32(HALF_RANGE[kind])
    return float(scale if scale > 0 else np.finfo(np.float32).eps)


def _squared_error(v: np.ndarray, d: float, kind: str) -> np.ndarray:
    """Expected squared error of quantizing magnitude v with scale d: saturation beyond the largest code,
    else half-even rounding to the code step there (v itself where v rounds to 0)."""
    y = v / d
    if kind == "int8":
        top, step = 127.0, np.ones_like(y)
    else:  # E4M3: 3 mantissa bits, subnormals below 2^-6 in steps of 2^-9
        top, step = E4M3_MAX, 2.0 ** (np.floor(np.log2(np.maximum(y, 2.0 ** -6))) - 3)
    rounding = np.where(y < step / 2, y ** 2, step ** 2 / 12)
    return np.where(y > top, (y - top) ** 2, rounding) * d ** 2


SCHEMES: dict[str, tuple[Callable[[torch.Tensor, float | None], torch.Tensor], str]] = {
    "fp8-token": (fp8_per_token, "inputs of the quantized Linears as FP8 E4M3, a dynamic scale per token"),
    "fp8-group128": (fp8_per_group128, "inputs of the quantized Linears as FP8 E4M3, a dynamic scale per token and "
                     "group of 128 features"),
    "int8-token": (int8_per_token, "inputs of the quantized Linears as INT8, a dynamic symmetric scale per token"),
    "fp8-tensor": (fp8_static, "inputs of the quantized Linears as FP8 E4M3, one calibrated scale per Linear"),
    "int8-tensor": (int8_static, "inputs of the quantized Linears as INT8, one calibrated symmetric scale per Linear"),
    "nvfp4-group16": (nvfp4_per_group16, "inputs of the quantized Linears as NVFP4 (E2M1), a dynamic E4M3 scale per "
                      "token and group of 16 over one calibrated global scale per Linear"),
    "mxfp4-group32": (mxfp4_per_group32, "inputs of the quantized Linears as MXFP4 (E2M1), a dynamic power-of-two "
                      "scale per token and group of 32"),
}


def simulate_inputs(layer: torch.nn.Module, inputs: dict[str, InputQuant]) -> None:
    """Quantize the input of each named submodule (relative to ``layer``) as its InputQuant says before it runs."""
    for name, q in inputs.items():
        rule, scale = SCHEMES[q.scheme][0], q.scale
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, rule=rule, scale=scale: (rule(args[0], scale), *args[1:]))


class KVCacheStandIn:
    """Passed to a layer's attention as its cache: the attention stores its keys (after the rotary embedding) and
    values through ``update``, which hands them to ``on_update`` and returns what it gives back, as compressed-tensors'
    QuantizedKVCache does for a checkpoint with a kv_cache_scheme."""

    def __init__(self, on_update: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.on_update, self.updates = on_update, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        self.updates += 1
        return self.on_update(key_states, value_states)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # what attention calls its cache: transformers >= 5.25, before


def cache_argument(module: torch.nn.Module) -> str | None:
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def attention_of(layer: torch.nn.Module, where: str) -> str:
    """The name of the one submodule of ``layer`` whose forward takes a cache: its attention."""
    names = [n for n, m in layer.named_modules() if n and cache_argument(m)]
    if len(names) != 1:
        raise UserError(f"{where}: a quantized KV cache needs one attention module per layer taking a cache "
                        f"({' or '.join(CACHE_ARGUMENTS)}); found {names or 'none'}")
    return names[0]


def through_kv_cache(layer: torch.nn.Module, attention: str, on_update: Callable) -> KVCacheStandIn:
    """Route ``attention``'s keys and values (in ``layer``) through a KVCacheStandIn calling ``on_update``."""
    cache, module = KVCacheStandIn(on_update), layer.get_submodule(attention)
    argument = cache_argument(module)
    module.register_forward_pre_hook(lambda _module, args, kwargs: (args, {**kwargs, argument: cache}), with_kwargs=True)
    return cache


def simulate_kv_cache(layer: torch.nn.Module, attention: str, k_scale: float, v_scale: float) -> KVCacheStandIn:
    """Keys and values stored in FP8 E4M3 with one static scale each, as vLLM's fp8 KV cache holds them."""
    return through_kv_cache(layer, attention, lambda k, v: (fp8_static(k, k_scale), fp8_static(v, v_scale)))


class KVRecorder:
    """The |x| histograms and maxima of the keys and values a layer stores, for its static KV-cache scales."""

    def __init__(self) -> None:
        self.hist = {name: torch.zeros(HIST_BINS, dtype=torch.float64) for name in ("k", "v")}
        self.max = {"k": 0.0, "v": 0.0}

    def add(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("k", k), ("v", v)):
            a = x.detach().abs().float().reshape(-1, x.shape[-1]).cpu()
            add_abs_histogram(self.hist[name], a)
            self.max[name] = max(self.max[name], float(a.max())) if a.numel() else self.max[name]
        return k, v

    def scales(self, kind: str) -> dict[str, float]:
        return {name: static_scale(self.hist[name].numpy(), self.max[name], kind) for name in ("k", "v")}
