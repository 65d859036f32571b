"""compressed-tensors: the HF checkpoint vLLM and transformers load, pack-quantized (int2..int8 weights, float
activations) or float-quantized (FP8 E4M3 weights, FP8 activations quantized per token at run time).

A folder like the one llm-compressor saves: config.json with the ``quantization_config`` built by the
``compressed-tensors`` package's own classes, model safetensors (sharded past ``SHARD_BYTES``), and the
tokenizer files. Each quantized Linear stores ``weight_packed`` (the method's signed codes, never re-rounded,
packed by kernels/words exactly as the package's ``pack_to_int32`` packs them), ``weight_scale``,
``weight_zero_point`` when asymmetric (packed along the output dim), and ``weight_shape``. Scales are written in float32 for a float32 model,
else float16: both hold the grid's fp16 scales exactly. The reader decodes with the package's own
``PackedQuantizationCompressor``, so validate measures what vLLM would load.

FP8 (llm-compressor's FP8_DYNAMIC scheme): each Linear stores ``weight`` as float8_e4m3fn (the grid's codes, bit
for bit) and a float32 ``weight_scale`` per row (or per group); the config group adds dynamic per-token FP8
``input_activations``. Scales stay float32 whatever the model dtype: the codes were chosen against them, and
vLLM keeps FP8 weight scales in float32 anyway. Decoded by compressed-tensors' ``FloatQuantizationCompressor``.

W8A8 (llm-compressor's W8A8 scheme, `activations: int8`): int-quantized, as llm-compressor saves it and vLLM's
W8A8 Linear loads it: ``weight`` holds the int8 codes as they are, ``weight_scale`` one scale per row (float32 for
a float32 model, else float16, as above), with dynamic symmetric per-token INT8 ``input_activations``; vLLM runs
it on int8 tensor cores. Decoded by compressed-tensors' ``IntQuantizationCompressor``. ``activations: float``
on fp8 is FP8 weight-only (vLLM dequantizes it in its Marlin kernel).

``kv_cache: fp8`` (llm-compressor's ``kv_cache_scheme``, vLLM's ``--kv-cache-dtype fp8``): each attention stores its
keys (after the rotary embedding) and values in FP8 E4M3 with one static scale each, ``self_attn.k_scale`` and
``v_scale`` (per tensor: vLLM's compressed-tensors loader takes no other), chosen as static input scales are from
the keys and values of the calibration tokens through the built layers. Not for multi-head latent attention,
whose cache holds a compressed latent.

FP4 (``type: nvfp4``, ``mxfp4``; llm-compressor's NVFP4, NVFP4A16, MXFP4A16 and MXFP4 presets, whose args the config
holds): E2M1 codes packed two per byte, with NVFP4's E4M3 scale per 16 over a float32 global scale (one for the
Linears reading one input, which vLLM fuses and gives one global scale) or MXFP4's E8M0 scale per 32
(compressed_fp4). NVFP4 activations are quantized per token and group of 16 over a global ``input_global_scale``
that quantize takes from the calibration inputs' largest magnitude (448 * 6 / max |x|, as llm-compressor's
static_minmax observer does). Decoded by compressed-tensors' NVFP4 and MXFP4 compressors, which return bfloat16.

``activation_scales: static`` (llm-compressor's static FP8 and INT8 schemes): instead of a scale per token at run
time, each quantized Linear stores ``input_scale``, one float32 scale that quantize chose from the histogram of
its input on the calibration tokens, measured through the layers as built (activations.static_scale: the clip
with the least squared error, the scale being the clip / 448 for FP8, / 127.5 for INT8). Cheaper at run time;
inputs beyond the clip saturate.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantfab.kernels.verdict import Verdict, compare
from quantfab.tasks.activations import InputQuant, MeasuredScales
from quantfab.kernels.words import PackedInts, WordLayout, pack_words, verify_words
from quantfab.tasks.convert.compressed_fp4 import (FORMATS as FP4_FORMATS, PRESETS, fp4_bytes, is_fp4, pack_fp4,
                                                   stored_fp4)
from quantfab.tasks.convert.hf_folder import FolderWeights, HFFolderFormat, PlannedTensor, write_folder
from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import ModelDir, TensorInfo
from quantfab.tasks.quantize.float_grids import FP8BlockGrid, FP8Grid
from quantfab.tasks.quantize.grids import Encoded, Grid, GridRequest, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

BLOCK = "128x128"  # group_size of FP8_BLOCK: a scale per 128 x 128 weights, inputs scaled per 128 of a token
# llm-compressor's W4A16, W8A16, FP8_DYNAMIC, NVFP4, MXFP4A16
DEFAULT_GROUP = {"int4": 128, "int8": "channel", "fp8": "channel", "nvfp4": 16, "mxfp4": 32}
DEFAULT_ACTIVATIONS = {"int4": "float", "int8": "float", "fp8": "fp8", "nvfp4": "nvfp4", "mxfp4": "float"}
# weight type -> the activations vLLM runs beside it (W8A8 int8 needs int8 codes per channel, symmetric)
ACTIVATIONS_FOR = {"int4": ("float", "int8"), "int8": ("float", "int8"), "fp8": ("float", "fp8"),
                   "nvfp4": ("float", "nvfp4"), "mxfp4": ("float", "mxfp4")}
FP4 = {"nvfp4": "NVFP4", "mxfp4": "MXFP4"}  # type -> its grid (fixed block, symmetric 4-bit float codes)


class CompressedTensorsOptions(BaseModel):
    """`{compressed-tensors: int4}` or `{format: compressed-tensors, type: int4, group_size: 32, symmetric: false}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["compressed-tensors"] = "compressed-tensors"
    type: Literal["int4", "int8", "fp8", "nvfp4", "mxfp4"] = Field(
        description="int4/int8: integer codes (quantize.bits and overrides may differ per module), activations left "
        "in float unless `activations: int8` (W8A8). fp8: FP8 E4M3 weights and FP8 activations quantized per "
        "token at run time (FP8_DYNAMIC). nvfp4: FP4 E2M1 weights with an E4M3 scale per 16 over a global scale "
        "per tensor, activations likewise per token at run time over a calibrated global scale (NVFP4; "
        "`activations: float` is NVFP4A16). mxfp4: FP4 E2M1 weights with a power-of-two scale per 32, activations "
        "in float (MXFP4A16; `activations: mxfp4` quantizes them the same way per token).")
    group_size: int | Literal["channel", "128x128"] | None = Field(
        None, description="Default elements per scale, 'channel' for one scale per row, or (fp8 only) '128x128' for "
        "one per block of 128 rows x 128 columns, with activations scaled per token and group of 128 at run time "
        "(FP8_BLOCK, as DeepSeek-V3 ships); empty: 128 for int4, channel for int8 and fp8. quantize.group_size "
        "overrides it.")
    symmetric: bool = Field(True, description="Default for symmetric codes; quantize.symmetric overrides it.")
    activations: Literal["float", "int8", "fp8", "nvfp4", "mxfp4"] | None = Field(
        None, description="How the engine quantizes each quantized Linear's input at run time, with a dynamic scale "
        "per token: float (not at all), int8 (W8A8: with type int8, symmetric, group_size channel), fp8 (with "
        "type fp8), nvfp4 or mxfp4 (with that type, per group of 16 or 32 of a token). Empty: fp8 for fp8, nvfp4 for "
        "nvfp4, float otherwise. validate simulates it.")
    activation_scales: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: each token's activations scaled by their absmax at run time. static: one "
        "scale per Linear input, stored in the checkpoint, chosen from a histogram of its inputs on the calibration "
        "tokens as the clip with the least squared error (cheaper at run time; inputs beyond the clip saturate).")
    kv_cache: Literal["fp8"] | None = Field(
        None, description="fp8: the attention's keys and values cached in FP8 E4M3 with one calibrated scale each per "
        "layer (vLLM's --kv-cache-dtype fp8, loaded from the checkpoint), combinable with any weight type; validate "
        "simulates it.")
    target_bits_per_weight: float | None = Field(None, gt=1, le=32, description=(
        "int4/int8 with float activations: a size budget instead of one type, the tensors' bytes per model "
        "parameter in bits. Each decoder-layer Linear gets int4 (groups of 128, 64 or 32) or int8 (per row or "
        "groups of 128), or only ``group_size`` where given, whichever minimises the summed output error within it "
        "(tasks/quantize/allocate.py); vLLM's WNA16 kernels run each Linear's own scheme."))

    @model_validator(mode="after")
    def _activations_match_the_weights(self) -> "CompressedTensorsOptions":
        if self.activations is not None and self.activations not in ACTIVATIONS_FOR[self.type]:
            raise ValueError(f"activations {self.activations} beside {self.type} weights is not a scheme vLLM runs: "
                             f"use one of {', '.join(ACTIVATIONS_FOR[self.type])}")
        if self.type in FP4 and (self.group_size not in (None, DEFAULT_GROUP[self.type]) or not self.symmetric):
            raise ValueError(f"{self.type} has symmetric codes and a scale per {DEFAULT_GROUP[self.type]}: drop "
                             "group_size and symmetric")
        if self.activations == "int8" and (self.type != "int8" or not self.symmetric or self.group_size not in
                                           (None, "channel")):
            raise ValueError("activations int8 (W8A8) needs type int8, symmetric codes and group_size channel")
        if self.activation_scales == "static" and self.input_activations not in ("int8", "fp8"):
            raise ValueError("activation_scales static needs int8 or fp8 activations (nvfp4's global input scale is "
                             "always calibrated, mxfp4's scales are per group at run time)")
        if self.target_bits_per_weight and (self.type not in ("int4", "int8") or self.input_activations != "float"):
            raise ValueError("target_bits_per_weight picks among int4 and int8 weights with float activations: use "
                             "type int4 or int8 without activations")
        if self.group_size == BLOCK and (self.type != "fp8" or self.input_activations != "fp8" or
                                        self.activation_scales != "dynamic"):
            raise ValueError(f"group_size {BLOCK} is FP8_BLOCK: type fp8 with dynamic fp8 activations (vLLM's block "
                             "FP8 Linear quantizes its input per token and group of 128 itself)")
        return self

    @property
    def stored_input_scale(self) -> str | None:
        """The scale each quantized Linear stores for its input, which quantize measures: a static scheme's
        ``input_scale`` or NVFP4's ``input_global_scale``; None where the runtime scales the inputs itself."""
        if self.activation_scales == "static":
            return "input_scale"
        return "input_global_scale" if self.input_activations == "nvfp4" else None

    @property
    def input_activations(self) -> str:
        return self.activations or DEFAULT_ACTIVATIONS[self.type]

    @property
    def key(self) -> str:
        group = self.group_size or DEFAULT_GROUP[self.type]
        acts = "" if self.input_activations == DEFAULT_ACTIVATIONS[self.type] else f"-a{self.input_activations}"
        shape = {"channel": "channel", BLOCK: f"b{BLOCK}"}.get(str(group), f"g{group}")
        return f"compressed-tensors-{self.type}-{shape}" + \
            ("" if self.symmetric else "-asym") + acts + ("-static" if self.activation_scales == "static" else "") + \
            (f"-kv{self.kv_cache}" if self.kv_cache else "") + \
            (f"-{self.target_bits_per_weight:g}bpw" if self.target_bits_per_weight else "")


INT_QUANTIZED = "int-quantized"  # PlannedTensor.storage of a W8A8 Linear: int8 ``weight``, not ``weight_packed``


def packed_bytes(shape: tuple[int, ...], grid_name: str, dtype: torch.dtype) -> int:
    grid = grid_named(grid_name)
    rows, cols = shape
    groups = cols // grid.block
    if is_fp4(grid):
        return fp4_bytes(rows, cols, grid)
    if isinstance(grid, FP8Grid):
        return rows * cols + -(-rows // grid.row_span) * groups * 4  # float8 weight, float32 weight_scale
    zeros = 0 if grid.symmetric else -(-rows * grid.bits // 32) * groups * 4
    scale_size = 4 if dtype == torch.float32 else 2
    return rows * -(-cols * grid.bits // 32) * 4 + rows * groups * scale_size + zeros + 2 * 8  # + weight_shape


class CompressedTensorsFormat(HFFolderFormat):
    name = "compressed-tensors"
    options = CompressedTensorsOptions
    packed_bytes = staticmethod(packed_bytes)

    def output_name(self, options: CompressedTensorsOptions, name: str) -> str:
        return f"{name}-{options.key.removeprefix('compressed-tensors-')}-ct"

    def budget_grids(self, options: CompressedTensorsOptions, preset: str | None = None) -> list[str]:
        """The schemes a size budget picks among: int4 in groups of 128, 64 or 32 and int8 per row or in groups of
        128 (vLLM's WNA16 group sizes), at the output's symmetry; only its ``group_size`` where it gives one."""
        pairs = ([(4, options.group_size), (8, options.group_size)] if options.group_size else
                 [(4, 128), (4, 64), (4, 32), (8, "channel"), (8, 128)])
        return [self.grid_for(options, GridRequest(bits, group)).name for bits, group in pairs]

    def grid_for(self, options: CompressedTensorsOptions, want: GridRequest, preset: str | None = None) -> Grid | None:
        if want.nf4:
            raise ValueError("compressed-tensors pack-quantized holds integer codes, not NF4 (use output bnb-nf4)")
        group = want.group_size or options.group_size or DEFAULT_GROUP[options.type]
        if options.type in FP4:
            if want.bits not in (None, 4) or want.symmetric is False or want.group_size not in (None, group):
                raise ValueError(f"compressed-tensors {options.type} holds symmetric 4-bit float codes with a scale per "
                                 f"{group}: drop quantize.bits, group_size and symmetric (or their overrides)")
            return grid_named(FP4[options.type])
        if options.type == "fp8":
            if want.bits not in (None, 8) or want.symmetric is False or not options.symmetric:
                raise ValueError("compressed-tensors fp8 holds symmetric 8-bit float codes: drop quantize.bits and "
                                 "quantize.symmetric (or their overrides), or use type int4/int8")
            if group not in ("channel", BLOCK):
                raise ValueError(f"compressed-tensors fp8 scales each row (group_size channel) or 128x128 blocks, not "
                                 f"groups of {group}: vLLM's FP8 Linear reads per-tensor, per-channel or 128x128-block "
                                 "weight scales")
            return grid_named("FP8_CH" if group == "channel" else "FP8_B128")
        bits = want.bits or int(options.type.removeprefix("int"))
        symmetric = options.symmetric if want.symmetric is None else want.symmetric
        if options.input_activations == "int8" and (bits != 8 or not symmetric or group != "channel"):
            raise ValueError("compressed-tensors W8A8 (activations int8) runs symmetric int8 codes with a scale per "
                             f"row; this Linear asks {bits} bits, {'' if symmetric else 'a'}symmetric, group_size "
                             f"{group}: drop the quantize.bits, symmetric or group_size override, or its activations")
        side = "SYM" if symmetric else "ASYM"
        return grid_named(f"INT{bits}_CH_{side}" if group == "channel" else f"INT{bits}_G{group}_{side}")

    def measured_scales(self, options: CompressedTensorsOptions) -> MeasuredScales:
        """Static input scales, NVFP4's global input scales, and the KV cache's scales are measured."""
        return MeasuredScales(options.input_activations if options.stored_input_scale else None, options.kv_cache)

    def plan(self, options: CompressedTensorsOptions, config, tensors: dict[str, TensorInfo],
             grids: dict[str, str | None], as_asked: bool = False) -> list[PlannedTensor]:
        """W8A8's Linears are int-quantized: the pack-quantized bytes less ``weight_shape`` (two int64); a static
        scheme's Linears add a float32 ``input_scale``."""
        if options.kv_cache and getattr(config, "kv_lora_rank", None):
            raise UserError(f"{options.key}: model_type {config.model_type!r} uses multi-head latent attention, whose "
                            "cache holds a compressed latent rather than keys and values: drop kv_cache")
        planned = super().plan(options, config, tensors, grids, as_asked)
        static = 4 if options.stored_input_scale else 0
        if options.input_activations == "int8":
            return [replace(t, storage=INT_QUANTIZED, nbytes=t.nbytes - 2 * 8 + static) if t.grid else t
                    for t in planned]
        return [replace(t, nbytes=t.nbytes + static) if t.grid else t for t in planned]

    def write(self, path: Path, options: CompressedTensorsOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], name: str) -> None:
        qc = quantization_config(planned, options.input_activations, options.activation_scales == "static",
                                 options.kv_cache)
        write_folder(path, model, qc, planned, lambda t: {**tensor_data(t), **input_scale(options, t)})

    def pack(self, t: PlannedTensor, enc: Encoded) -> dict[str, torch.Tensor]:
        grid = grid_named(t.grid or "")
        module = t.hf_name.removesuffix(".weight")
        if is_fp4(grid):
            return pack_fp4(module, grid, enc)
        if isinstance(grid, FP8Grid):
            scale = grid.block_scales(enc.d) if isinstance(grid, FP8BlockGrid) else enc.d
            return {t.hf_name: torch.from_numpy(enc.codes.view(np.uint8)).view(torch.float8_e4m3fn),
                    f"{module}.weight_scale": torch.from_numpy(scale)}
        scale_dtype = torch.float32 if t.dtype == torch.float32 else torch.float16
        if t.storage == INT_QUANTIZED:
            return {t.hf_name: torch.from_numpy(enc.codes.astype(np.int8)),
                    f"{module}.weight_scale": torch.from_numpy(enc.d).to(scale_dtype)}
        code_layout, zero_layout = layouts(grid.bits)
        out = {f"{module}.weight_packed": torch.from_numpy(pack_words(enc.codes, code_layout)),
               f"{module}.weight_scale": torch.from_numpy(enc.d).to(scale_dtype),
               f"{module}.weight_shape": torch.tensor(t.shape, dtype=torch.int64)}
        if not grid.symmetric:
            assert enc.m is not None
            out[f"{module}.weight_zero_point"] = torch.from_numpy(pack_words(enc.m.astype(np.int8), zero_layout))
        return out

    def reader(self, path: Path, config) -> FolderWeights:
        return compressed_tensors_weights(path)

    def verify(self, folder: FolderWeights, t: PlannedTensor, expected: np.ndarray) -> Verdict:
        grid = grid_named(t.grid or "")
        module = t.hf_name.removesuffix(".weight")
        if is_fp4(grid):
            return compare(grid.decode(stored_fp4(folder.raw, module, grid)), expected)
        if isinstance(grid, FP8Grid):
            codes = folder.raw(t.hf_name).view(torch.uint8).numpy()
            scale = np.repeat(folder.raw(f"{module}.weight_scale").numpy(), grid.row_span, axis=0)[:codes.shape[0]]
            return compare(grid.decode(Encoded(codes.view(np.int8), scale, None)), expected)
        if t.storage == INT_QUANTIZED:
            codes, scale = folder.raw(t.hf_name).numpy(), folder.raw(f"{module}.weight_scale").float().numpy()
            return compare(grid.decode(Encoded(codes, scale, None)), expected)
        code_layout, zero_layout = layouts(grid.bits)
        zeros = folder.raw(f"{module}.weight_zero_point").numpy() if not grid.symmetric else None
        return verify_words(PackedInts(folder.raw(f"{module}.weight_packed").numpy(), code_layout,
                                       folder.raw(f"{module}.weight_scale").numpy(), grid.block, zeros=zeros,
                                       zero_layout=zero_layout), expected)


def input_scale(options: CompressedTensorsOptions, t: PlannedTensor) -> dict[str, torch.Tensor]:
    """A static scheme's ``input_scale`` of a quantized Linear, or NVFP4's ``input_global_scale``, as quantize chose
    it (float32, shape [1])."""
    name = options.stored_input_scale
    if name is None or t.grid is None:
        return {}
    if t.input_scale is None:
        raise RuntimeError(f"{t.hf_name}: quantize chose no input scale for it")
    return {f"{t.hf_name.removesuffix('.weight')}.{name}": torch.tensor([t.input_scale], dtype=torch.float32)}


def layouts(bits: int) -> tuple[WordLayout, WordLayout]:
    """pack_to_int32's: codes along the input dim (packed_dim 1), zero points along the output dim (packed_dim 0)."""
    offset = 1 << (bits - 1)
    return WordLayout(bits, 1, True, offset), WordLayout(bits, 0, False, offset)


def quantization_config(weights: list[PlannedTensor], activations: str, static: bool = False,
                        kv_cache: str | None = None) -> dict:
    """compressed-tensors' own QuantizationConfig: one config group per scheme, float Linears ignored; the
    quantized Linears' inputs quantized as ``activations`` says (float: not at all), per token at run time or,
    ``static``, by one stored scale per Linear; with ``kv_cache`` its ``kv_cache_scheme``."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    linears = [t for t in weights if len(t.shape) == 2 and "embed_tokens" not in t.hf_name]
    kv = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False) \
        if kv_cache else None
    by_args: dict[tuple, list[str]] = {}  # (type, bits, symmetric, strategy, group or block size) -> modules
    fp4 = {t.grid for t in linears if t.grid and is_fp4(grid_named(t.grid))}
    for t in linears:
        if t.grid and t.grid not in fp4:
            grid = grid_named(t.grid)
            kind = "float" if isinstance(grid, FP8Grid) else "int"
            shape = ("block", grid.block) if isinstance(grid, FP8BlockGrid) else \
                ("channel", None) if grid.block == t.shape[1] else ("group", grid.block)
            by_args.setdefault((kind, grid.bits, grid.symmetric, *shape), []).append(t.hf_name.removesuffix(".weight"))
    # each token's activations scaled by their absmax at run time (FP8_DYNAMIC, W8A8; FP8_BLOCK per group of a
    # token, as its weight blocks are wide), or by a stored scale
    inputs = None if activations == "float" else QuantizationArgs(
        num_bits=8, type="float" if activations == "fp8" else "int", symmetric=True,
        strategy="tensor" if static else "token", dynamic=not static)
    groups = {}
    # groups in the order of (type, bits, symmetric, size): transformers' MoE loading reads them in this order
    ordered = sorted(by_args.items(), key=lambda item: str((*item[0][:3], item[0][4])))
    for i, ((kind, bits, symmetric, strategy, size), modules) in enumerate(ordered):
        args = QuantizationArgs(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy,
                                group_size=size if strategy == "group" else None,
                                block_structure=[size, size] if strategy == "block" else None)
        per_group = strategy == "block" and inputs is not None
        groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(by_args) == 1 else modules, weights=args,
            input_activations=inputs.model_copy(update={"strategy": "group", "group_size": size}) if per_group
            else inputs)
    kinds = {kind for kind, *_ in by_args}
    if len(kinds) > 1 or fp4 and len(fp4) + len(by_args) > 1:
        raise ValueError("compressed-tensors: one output holds integer, fp8 or fp4 codes, not a mix")
    ignore = [t.hf_name.removesuffix(".weight") for t in linears if not t.grid]
    if not any(t.hf_name == "lm_head.weight" for t in linears):
        ignore.append("lm_head")  # tied to the embedding, so not stored, but the loader still builds the Linear
    fmt = "float-quantized" if kinds == {"float"} else INT_QUANTIZED if activations == "int8" else "pack-quantized"
    if fp4:  # llm-compressor's preset, as it writes it: the E4M3 or E8M0 scale types are part of the args
        (grid,) = fp4
        fmt, groups = FP4_FORMATS[grid], {"group_0": QuantizationScheme(targets=["Linear"],
                                                                      **PRESET_SCHEMES[PRESETS[grid, activations]])}
    qc = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed",
                            ignore=ignore, kv_cache_scheme=kv)
    return {"version": ct_version, **qc.model_dump(mode="json", exclude_none=False)}


def compressed_tensors_weights(path: Path) -> FolderWeights:
    """The folder's weights decoded by compressed-tensors' own compressor for its format (packed or float)."""
    from compressed_tensors.compressors.naive_quantized.base import (FloatQuantizationCompressor,
                                                                     IntQuantizationCompressor)
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    stored = json.loads((path / "config.json").read_text())["quantization_config"]
    naive = {"float-quantized": FloatQuantizationCompressor, INT_QUANTIZED: IntQuantizationCompressor}.get(
        stored.get("format"))  # weight + weight_scale, the codes as they are
    packed = {FP4_FORMATS["NVFP4"]: NVFP4PackedCompressor, FP4_FORMATS["MXFP4"]: MXFP4PackedCompressor}.get(
        stored.get("format"), PackedQuantizationCompressor)
    schemes = list(QuantizationConfig.model_validate(
        {k: v for k, v in stored.items() if k in QuantizationConfig.model_fields}).config_groups.values())

    def decode(module: str, folder: FolderWeights) -> torch.Tensor:
        scheme = scheme_of(path, module, schemes)
        if naive is not None:
            state = {"weight": folder.raw(f"{module}.weight"), "weight_scale": folder.raw(f"{module}.weight_scale")}
            return naive.decompress(state, scheme)["weight"]
        parts = [f"{module}.weight_{k}" for k in ("packed", "scale", "shape", "zero_point", "global_scale")]
        state = {p.rsplit(".", 1)[1]: folder.raw(p) for p in parts if folder.has(p)}
        return packed.decompress(state, scheme)["weight"]

    folder = FolderWeights(path, "weight_scale" if naive is not None else "weight_packed", decode)
    modules = [n.removesuffix(".weight_scale") for n in folder.index.tensors if n.endswith(".weight_scale")]
    folder.inputs = {m: q for m in modules if (q := input_quant(folder, m, scheme_of(path, m, schemes))) is not None}
    if stored.get("kv_cache_scheme"):
        folder.kv_scales = kv_scales(folder, stored["kv_cache_scheme"])
    return folder


def kv_scales(folder: FolderWeights, scheme: dict) -> dict[str, tuple[float, float]]:
    """Attention module -> its stored (k_scale, v_scale), for a kv_cache_scheme validate can simulate."""
    if {k: scheme.get(k) for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")} != \
            {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}:
        raise UserError(f"{folder.path / 'config.json'}: kv_cache_scheme {scheme} cannot be simulated by validate "
                        "(it simulates FP8 with a static scale per tensor, what vLLM loads)")
    attention = sorted(n.removesuffix(".k_scale") for n in folder.index.tensors if n.endswith(".k_scale"))
    if not attention:
        raise UserError(f"{folder.path}: kv_cache_scheme is set but no attention stores a k_scale")
    missing = [f"{a}.v_scale" for a in attention if not folder.has(f"{a}.v_scale")]
    if missing:
        raise UserError(f"{folder.path}: kv_cache_scheme is set and {', '.join(missing)} is missing (each attention "
                        "stores a k_scale and a v_scale)")
    return {a: (folder.scalar(f"{a}.k_scale"), folder.scalar(f"{a}.v_scale")) for a in attention}


def scheme_of(path: Path, module: str, schemes: list) -> Any:
    """The config group of quantization_config that targets ``module``."""
    scheme = next((s for s in schemes if module in s.targets or s.targets == ["Linear"]), None)
    if scheme is None:
        raise UserError(f"{path / 'config.json'}: no config group of quantization_config targets {module}")
    return scheme


INPUT_SCHEMES = {  # (type, bits, strategy, dynamic, symmetric, group) of input_activations -> activations.SCHEMES name
    ("float", 8, "token", True, True, None): "fp8-token", ("int", 8, "token", True, True, None): "int8-token",
    ("float", 8, "group", True, True, 128): "fp8-group128",
    ("float", 4, "tensor_group", "local", True, 16): "nvfp4-group16",
    ("float", 4, "group", True, True, 32): "mxfp4-group32",
    ("float", 8, "tensor", False, True, None): "fp8-tensor", ("int", 8, "tensor", False, True, None): "int8-tensor"}


def input_quant(folder: FolderWeights, module: str, scheme: Any) -> InputQuant | None:
    """How the runtime quantizes ``module``'s input (None: left in float), with a static scheme's stored scale."""
    a = scheme.input_activations
    if a is None:
        return None
    name = INPUT_SCHEMES.get((a.type, a.num_bits, a.strategy, a.dynamic, a.symmetric, a.group_size))
    if name is None:
        raise UserError(f"{folder.path / 'config.json'}: input_activations {a.model_dump(exclude_none=True)} of "
                        f"{module} cannot be simulated by validate yet (it simulates symmetric 8-bit FP8 and INT8, "
                        "dynamic per token or static per tensor, FP8 per token and group of 128, NVFP4 and MXFP4 "
                        "as llm-compressor's presets)")
    stored = "input_global_scale" if a.dynamic == "local" else None if a.dynamic else "input_scale"
    if stored is None:
        return InputQuant(name)
    if not folder.has(f"{module}.{stored}"):
        raise UserError(f"{folder.path}: {module}'s input_activations need a stored scale, and {module}.{stored} "
                        "is missing")
    return InputQuant(name, folder.scalar(f"{module}.{stored}"))
