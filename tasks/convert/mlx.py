"""mlx: the checkpoint mlx-lm loads on Apple silicon (and on Linux CPUs): MLX's affine quantization.

Per quantized Linear (out, in): ``weight`` uint32 (out, in * bits / 32), each row's unsigned codes as one
little-endian bit stream (3-, 5- and 6-bit codes straddle bytes); ``scales`` and ``biases`` (out, in / group) in
the checkpoint's float type; value = scales * u + biases. config.json carries ``quantization`` (and the same as
``quantization_config``): the default ``group_size``, ``bits`` and ``mode: affine``, and an entry per Linear whose
bits or group differ (``quantize.overrides``: mixed precision, as mlx-lm's own mixed recipes write it). Like
mlx-lm's convert, the embedding (and an untied head) are quantized too, by MLX's own rule, where their rows
divide by the group; Linears whose rows do not stay float. A layer's experts (one checkpoint matrix per expert)
are stacked as mlx-lm's SwitchGLU holds them: ``<prefix>.switch_mlp.<matrix>.{weight,scales,biases}`` with the
expert first (the family table renames matrices where mlx-lm does: Mixtral's w1/w2/w3); every expert of a stack
then needs the same bits and group. Safetensors shards as save_pretrained cuts them, with metadata ``format: mlx``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantfab.kernels.verdict import Verdict, compare
from quantfab.tasks.convert.hf_folder import (FolderWeights, HFFolderFormat, PlannedTensor, model_dtype, plan_tensors,
                                             write_folder)
from quantfab.tasks.errors import UserError
from quantfab.tasks.families import family
from quantfab.tasks.modelio import ModelDir, TensorInfo
from quantfab.tasks.quantize.grid_base import reference_by_rows
from quantfab.tasks.quantize.grids import Encoded, Grid, GridRequest, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")
safetensors_torch = lazy("safetensors.torch")

BITS = {"int2": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6, "int8": 8}
SCALE_TYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
OWN = ("model.embed_tokens", "lm_head")  # quantized by the format itself, as mlx-lm's convert does
EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<matrix>[^.]+)$")  # a checkpoint's expert matrix


class MLXOptions(BaseModel):
    """`{mlx: int4}` or `{format: mlx, type: int4, group_size: 64, dtype: bfloat16}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["mlx"] = "mlx"
    type: Literal["int2", "int3", "int4", "int5", "int6", "int8"] = Field(
        description="Bits of MLX's affine codes (quantize.overrides may set others per Linear: mixed precision).")
    group_size: Literal[32, 64, 128] = Field(64, description="Inputs per scale and bias (mlx-lm's default 64).")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="Float type of the scales, biases and float tensors; default the model's (mlx-lm's).")
    target_bits_per_weight: float | None = Field(None, gt=1, le=32, description=(
        "A size budget instead of one width: the tensors' bytes per model parameter, in bits. Each decoder-layer "
        "Linear gets the width (2, 3, 4, 5, 6 or 8 bits) and group (32, 64 or 128) that minimise the summed predicted "
        "KL within it (tasks/quantize/allocate.py), as mlx-lm's dynamic_quant --target-bpw does between two widths; "
        "the embedding and head keep ``type`` and ``group_size``."))

    @property
    def key(self) -> str:
        return (f"mlx-{self.type}-g{self.group_size}" + (f"-{self.dtype}" if self.dtype else "")
                + (f"-{self.target_bits_per_weight:g}bpw" if self.target_bits_per_weight else ""))


def packed_bytes(shape: tuple[int, ...], grid_name: str, dtype: torch.dtype) -> int:
    rows, cols = shape
    grid = grid_named(grid_name)
    return rows * cols * grid.bits // 8 + 2 * rows * (cols // grid.block) * dtype.itemsize


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) unsigned codes -> (rows, cols * bits / 32) uint32: each row one little-endian bit stream."""
    rows, cols = codes.shape
    planes = ((codes.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(rows, cols * bits), axis=1, bitorder="little").view("<u4")


def unpack_bits(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """``pack_bits`` undone: (rows, cols) unsigned codes as int32."""
    stream = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
    planes = stream[:, :cols * bits].reshape(-1, cols, bits).astype(np.int32)
    return (planes << np.arange(bits, dtype=np.int32)).sum(axis=-1)


class MLXFormat(HFFolderFormat):
    name = "mlx"
    options = MLXOptions
    packed_bytes = staticmethod(packed_bytes)

    def presets(self, options: MLXOptions, config, tensors: dict[str, TensorInfo]) -> dict[str, str | None]:
        """Every Linear's stored float type: the grids carry it (``grid_for`` reads it here)."""
        tag = _scale_type(_dtype(options, config))
        return {name.removesuffix(".weight"): tag for name, t in tensors.items() if len(t.shape) == 2}

    def budget_grids(self, options: MLXOptions, preset: str | None = None) -> list[str]:
        """What a size budget picks among: every width in groups of 32, 64 and 128 (mlx-lm reads each Linear's own
        bits and group from config.json), in the Linear's float type."""
        tag = preset or SCALE_TYPE[options.dtype or "float32"]
        return [f"MLX{b}_G{g}_{tag}" for b in BITS.values() for g in (32, 64, 128)]

    def grid_for(self, options: MLXOptions, want: GridRequest, preset: str | None = None) -> Grid | None:
        if want.nf4:
            raise ValueError("mlx checkpoints hold MLX's affine codes, not NF4 (use output bnb-nf4)")
        if want.symmetric:
            raise ValueError("mlx's affine grid has a bias per group: symmetric codes have no layout there")
        bits, group = want.bits or BITS[options.type], want.group_size or options.group_size
        if bits not in BITS.values() or group not in (32, 64, 128):
            raise ValueError(f"mlx holds {', '.join(map(str, BITS.values()))}-bit codes in groups of 32, 64 or 128, "
                             f"not {bits} bits in groups of {group}")
        return grid_named(f"MLX{bits}_G{group}_{preset or SCALE_TYPE[options.dtype or 'float32']}")

    def plan(self, options: MLXOptions, config, tensors: dict[str, TensorInfo], grids: dict[str, str | None],
             as_asked: bool = False) -> list[PlannedTensor]:
        """The HF tensors, the embedding and an untied head on the output's default grid where they fit it."""
        dtype = _dtype(options, config)
        tag = _scale_type(dtype)
        own = {m: f"MLX{BITS[options.type]}_G{options.group_size}_{tag}" for m in OWN
               if f"{m}.weight" in tensors and tensors[f"{m}.weight"].shape[1] % options.group_size == 0}
        planned = plan_tensors(config, tensors, {**own, **grids}, type(self).packed_bytes)
        stacks: dict[str, set[str | None]] = {}
        for t in planned:
            stack = stacked_module(config.model_type, t.hf_name.removesuffix(".weight"))
            if stack:
                stacks.setdefault(stack[0], set()).add(t.grid)
        for stack, kinds in stacks.items():
            if len(kinds) > 1:
                raise UserError(f"mlx: {stack} stacks a layer's experts into one tensor, but they would be stored as "
                                f"{sorted(k or 'float' for k in kinds)}; every expert of a layer needs the same bits "
                                "and group (check quantize.overrides and quantize.ignore)")
        return [replace(t, dtype=dtype, nbytes=packed_bytes(t.shape, t.grid, dtype) if t.grid
                        else int(np.prod(t.shape)) * dtype.itemsize) for t in planned]

    def float_codes(self, t: PlannedTensor, load: Callable[[], np.ndarray]) -> tuple[Grid, Encoded] | None:
        """The embedding's and head's codes, by MLX's own rule."""
        if t.grid is None:
            return None
        grid = grid_named(t.grid)
        return grid, reference_by_rows(grid, load().astype(np.float32))

    def write(self, path: Path, options: MLXOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], name: str) -> None:
        config = model.config()
        model_type = config.model_type
        default = {"group_size": options.group_size, "bits": BITS[options.type], "mode": "affine"}
        quantization: dict = dict(default)
        for t in planned:
            if t.grid:
                grid = grid_named(t.grid)
                if (grid.bits, grid.block) != (default["bits"], default["group_size"]):
                    module = t.hf_name.removesuffix(".weight")
                    stack = stacked_module(model_type, module)
                    quantization[stack[0] if stack else module] = {"group_size": grid.block, "bits": grid.bits,
                                                                   "mode": "affine"}
        write_folder(path, model, quantization, planned, _stacking(model_type, planned, tensor_data),
                     {**_legacy_keys(model.path, config), "quantization": quantization,
                      "torch_dtype": str(planned[0].dtype).removeprefix("torch.")}, "mlx")

    def pack(self, t: PlannedTensor, enc: Encoded) -> dict[str, torch.Tensor]:
        grid = grid_named(t.grid or "")
        module = t.hf_name.removesuffix(".weight")
        unsigned = enc.codes.astype(np.int16) + grid.offset  # type: ignore[attr-defined]
        return {f"{module}.weight": torch.from_numpy(pack_bits(unsigned, grid.bits).astype(np.uint32)),
                f"{module}.scales": torch.from_numpy(enc.d.astype(np.float32)).to(t.dtype),
                f"{module}.biases": torch.from_numpy(enc.m.astype(np.float32)).to(t.dtype)}

    def reader(self, path: Path, config) -> "MLXWeights":
        return MLXWeights(path)

    def verify(self, folder: FolderWeights, t: PlannedTensor, expected: np.ndarray) -> Verdict:
        return compare(decode_mlx(t.hf_name.removesuffix(".weight"), folder).numpy(), expected, 0.0)


def _legacy_keys(folder: Path, config) -> dict:
    """The config keys mlx-lm reads by their older names, where the checkpoint was saved under newer ones (the
    config class's attribute_map aliases, rope_theta out of transformers 5's rope_parameters)."""
    saved = json.loads((folder / "config.json").read_text())
    out = {alias: saved[name] for alias, name in type(config).attribute_map.items()
           if alias not in saved and name in saved}
    rope = saved.get("rope_parameters")
    if "rope_theta" not in saved and isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    return out


def stacked_module(model_type: str, module: str) -> tuple[str, int] | None:
    """mlx-lm's switch_mlp module that holds an expert's matrix, and the expert's index; None for other modules."""
    found = EXPERT.match(module)
    if found is None:
        return None
    matrix = family(model_type).mlx_experts.get(found["matrix"], found["matrix"])
    return f"{found['prefix']}.switch_mlp.{matrix}", int(found["expert"])


TensorData = Callable[[PlannedTensor], dict[str, "torch.Tensor"]]  # quoted: torch stays unimported


def _stacking(model_type: str, planned: list[PlannedTensor], tensor_data: TensorData) -> TensorData:
    """``tensor_data`` with each layer's experts held back until the last of a stack arrives, then stacked in expert
    order under the switch_mlp names (one layer's experts in memory at a time: plan order is by layer)."""
    size: dict[str, int] = {}
    for t in planned:
        stack = stacked_module(model_type, t.hf_name.removesuffix(".weight"))
        if stack:
            size[stack[0]] = size.get(stack[0], 0) + 1
    held: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def data(t: PlannedTensor) -> dict[str, torch.Tensor]:
        module = t.hf_name.removesuffix(".weight")
        stack = stacked_module(model_type, module)
        if stack is None:
            return tensor_data(t)
        name, expert = stack
        held.setdefault(name, {})[expert] = {k.removeprefix(module + "."): v for k, v in tensor_data(t).items()}
        if len(held[name]) < size[name]:
            return {}
        experts = held.pop(name)
        return {f"{name}.{part}": torch.stack([experts[e][part] for e in sorted(experts)]) for part in experts[0]}

    return data


class MLXWeights(FolderWeights):
    """A written mlx folder read under checkpoint names: an expert's matrix is its slice of the switch_mlp stack."""

    def __init__(self, path: Path):
        super().__init__(path, "scales", decode_mlx)
        self.model_type = str(self.config["model_type"])

    def stored(self, name: str) -> tuple[str, int | None]:
        """Where a checkpoint tensor (``<module>.<part>``) is stored: its stacked name and expert, or itself."""
        module, _, part = name.rpartition(".")
        stack = None if super().has(name) else stacked_module(self.model_type, module)
        return (f"{stack[0]}.{part}", stack[1]) if stack else (name, None)

    def raw(self, name: str) -> torch.Tensor:
        stored, expert = self.stored(name)
        data = super().raw(stored)
        return data if expert is None else data[expert]

    def has(self, name: str) -> bool:
        return super().has(self.stored(name)[0])

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        experts = [n for n in names if self.stored(n)[1] is not None]
        out = super().load([n for n in names if n not in experts])
        for name in experts:
            module = name.removesuffix(".weight")
            out[name] = decode_mlx(module, self) if self.has(f"{module}.scales") else self.raw(name).float()
        return out


def _dtype(options: MLXOptions, config) -> torch.dtype:
    """The folder's float type: the option's, else the model's (as mlx-lm's convert)."""
    return getattr(torch, options.dtype) if options.dtype else model_dtype(config)


def _scale_type(dtype: torch.dtype) -> str:
    return SCALE_TYPE[str(dtype).removeprefix("torch.")]


def decode_mlx(module: str, folder: MLXWeights) -> torch.Tensor:
    """(out, in) float32: scales * u + biases in float32, u unpacked from the bit stream."""
    words = folder.raw(f"{module}.weight").numpy()
    scales = folder.raw(f"{module}.scales").float().numpy()
    biases = folder.raw(f"{module}.biases").float().numpy()
    rows, groups = scales.shape
    group = _group_of(module, folder)
    bits = words.shape[1] * 32 // (groups * group)
    u = unpack_bits(words, bits, groups * group).astype(np.float32).reshape(rows, groups, group)
    return torch.from_numpy((scales[..., None] * u + biases[..., None]).reshape(rows, groups * group))


def _group_of(module: str, folder: MLXWeights) -> int:
    quantization = folder.config["quantization"]
    stored = folder.stored(f"{module}.weight")[0].removesuffix(".weight")
    return int(quantization.get(stored, quantization)["group_size"])
