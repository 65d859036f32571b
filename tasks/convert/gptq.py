"""gptq: the AutoGPTQ / GPTQModel v1 checkpoint (``checkpoint_format: gptq``) that transformers and vLLM load.

Per quantized Linear (in -> out features): ``qweight`` int32 (in * bits / 32, out), codes packed along the
input dim, low bits first; ``qzeros`` int32 (groups, out * bits / 32), the zero point *minus one* (v1's
offset) packed along the output dim; ``scales`` float16 (groups, out); ``g_idx`` int32 (in,), each input
column's group. Codes are unsigned: u = q + 2^(bits-1) for our signed q, and the zero point likewise, so
w = scale * (u - zero). Groups stay contiguous (act_order changes the column order GPTQ processes, not
the groups), so ``g_idx`` is i // group_size and ``desc_act`` is false: every v1 kernel can serve it.
One bit width and group size for the whole model, as the v1 config holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantfab.kernels.verdict import Verdict
from quantfab.kernels.words import PackedInts, WordLayout, pack_words, unpack_words_reference, verify_words
from quantfab.tasks.convert.hf_folder import FolderWeights, HFFolderFormat, PlannedTensor, write_folder
from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import ModelDir
from quantfab.tasks.quantize.grids import Encoded, Grid, GridRequest, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

BITS = {"int4": 4, "int8": 8}  # widths that pack whole codes into an int32


class GPTQOptions(BaseModel):
    """`{gptq: int4}` or `{format: gptq, type: int4, group_size: 32, symmetric: false}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["gptq"] = "gptq"
    type: Literal["int4", "int8"] = Field(description="Code width of every quantized Linear.")
    group_size: int = Field(128, ge=1, description="Input elements per scale, for every quantized Linear.")
    symmetric: bool = Field(True, description="sym in the config; asymmetric zero points must be at least 1 "
                            "(v1 stores zero - 1 in unsigned bits).")

    @property
    def key(self) -> str:
        return f"gptq-{self.type}-g{self.group_size}" + ("" if self.symmetric else "-asym")


def packed_bytes(shape: tuple[int, ...], grid_name: str, dtype: torch.dtype) -> int:
    grid = grid_named(grid_name)
    rows, cols = shape  # out, in
    groups = cols // grid.block
    return cols * grid.bits // 8 * rows + groups * rows * grid.bits // 8 + groups * rows * 2 + cols * 4


class GPTQFormat(HFFolderFormat):
    name = "gptq"
    options = GPTQOptions
    packed_bytes = staticmethod(packed_bytes)

    def grid_for(self, options: GPTQOptions, want: GridRequest, preset: str | None = None) -> Grid | None:
        if want.nf4:
            raise ValueError("gptq checkpoints hold integer codes, not NF4 (use output bnb-nf4)")
        bits, symmetric = BITS[options.type], options.symmetric
        asked = (want.bits or bits, want.group_size or options.group_size,
                 symmetric if want.symmetric is None else want.symmetric)
        if asked != (bits, options.group_size, symmetric):
            raise ValueError(f"a gptq checkpoint holds one scheme for every Linear ({bits} bits, group_size "
                             f"{options.group_size}, symmetric={symmetric}); use compressed-tensors for mixed precision")
        return grid_named(f"INT{bits}_G{options.group_size}_{'SYM' if symmetric else 'ASYM'}")

    def write(self, path: Path, options: GPTQOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], name: str) -> None:
        kept = [t.hf_name.removesuffix(".weight") for t in planned
                if t.grid is None and len(t.shape) == 2 and t.hf_name.startswith("model.layers.")]
        config = {"quant_method": "gptq", "bits": BITS[options.type], "group_size": options.group_size,
                  "desc_act": False, "sym": options.symmetric, "static_groups": False, "true_sequential": True,
                  "damp_percent": 0.01, "checkpoint_format": "gptq", "meta": {"quantizer": ["quantfab"]},
                  # GPTQModel's per-module rules: "-:" keeps a module in float (rows that no group divides)
                  "dynamic": {f"-:^{m.replace('.', '[.]')}$": {} for m in kept} or None}
        write_folder(path, model, {k: v for k, v in config.items() if v is not None}, planned, tensor_data)

    def pack(self, t: PlannedTensor, enc: Encoded) -> dict[str, torch.Tensor]:
        grid = grid_named(t.grid or "")
        module = t.hf_name.removesuffix(".weight")
        code_layout, zero_layout = layouts(grid.bits)
        zero = np.zeros(enc.d.shape, np.int8) if enc.m is None else enc.m.astype(np.int8)  # signed, (out, groups)
        unsigned = zero.astype(np.int32) + zero_layout.offset
        if (unsigned < 1).any():
            row, group = np.argwhere(unsigned < 1)[0]
            raise UserError(f"{module}: gptq v1 cannot store zero point 0 (row {row}, group {group}): it writes zero - 1 "
                            "in unsigned bits. Use symmetric: true, or output compressed-tensors for asymmetric codes")
        cols = enc.codes.shape[1]
        stored_zero = WordLayout(grid.bits, 0, True, zero_layout.offset - 1)  # v1 stores zero - 1
        return {f"{module}.qweight": torch.from_numpy(pack_words(enc.codes, code_layout)),
                f"{module}.qzeros": torch.from_numpy(pack_words(zero, stored_zero)),
                f"{module}.scales": torch.from_numpy(enc.d.T.astype(np.float16).copy()),
                f"{module}.g_idx": torch.from_numpy((np.arange(cols) // grid.block).astype(np.int32))}

    def reader(self, path: Path, config) -> FolderWeights:
        return FolderWeights(path, "qweight", decode_gptq_v1)

    def verify(self, folder: FolderWeights, t: PlannedTensor, expected: np.ndarray) -> Verdict:
        return verify_words(stored_ints(t.hf_name.removesuffix(".weight"), folder, grid_named(t.grid or "").block),
                            expected)


def layouts(bits: int) -> tuple[WordLayout, WordLayout]:
    """qweight: codes packed along the input dim, stored (in words, out); qzeros: along out, (groups, out words)."""
    offset = 1 << (bits - 1)
    return WordLayout(bits, 1, False, offset), WordLayout(bits, 0, True, offset)


def stored_ints(module: str, folder: FolderWeights, group: int) -> PackedInts:
    code_layout, zero_layout = layouts(int(folder.config["quantization_config"]["bits"]))
    return PackedInts(folder.raw(f"{module}.qweight").numpy(), code_layout, folder.raw(f"{module}.scales").numpy(),
                      group, scales_transposed=True, zeros=folder.raw(f"{module}.qzeros").numpy(),
                      zero_layout=zero_layout, zero_adjust=1)


def decode_gptq_v1(module: str, folder: FolderWeights) -> torch.Tensor:
    """(out, in) float32 weights: scales[g_idx] * (q - zero), as v1 kernels compute them (zero = qzeros + 1)."""
    code_layout, zero_layout = layouts(int(folder.config["quantization_config"]["bits"]))
    scales = folder.raw(f"{module}.scales").numpy().astype(np.float32)  # (groups, out)
    g = folder.raw(f"{module}.g_idx").numpy().astype(np.int64)
    q = unpack_words_reference(folder.raw(f"{module}.qweight").numpy(), code_layout, (scales.shape[1], g.size))
    zeros = unpack_words_reference(folder.raw(f"{module}.qzeros").numpy(), zero_layout, scales.T.shape) + 1
    return torch.from_numpy((scales.T[:, g] * (q - zeros[:, g]).astype(np.float32)).copy())
