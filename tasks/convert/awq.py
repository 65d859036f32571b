"""awq: the AutoAWQ GEMM checkpoint (``quant_method: awq``, ``version: gemm``) that transformers and vLLM load.

Per quantized Linear (in -> out features): ``qweight`` int32 (in, out / 8), eight 4-bit codes per word
packed along the *output* dim in AWQ's interleaved order (output column 8j + ORDER[k] in bits 4k..4k+3);
``qzeros`` int32 (groups, out / 8), the unsigned zero points packed the same way; ``scales`` float16
(groups, out). w = scale * (u - zero) with unsigned codes u = q + 8 for our signed q. AWQ checkpoints
always carry zero points, so a symmetric grid is stored with every zero point at 8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantfab.kernels.verdict import Verdict
from quantfab.kernels.words import PackedInts, WordLayout, decode_reference, pack_words, verify_words
from quantfab.tasks.convert.hf_folder import FolderWeights, HFFolderFormat, PlannedTensor, write_folder
from quantfab.tasks.modelio import ModelDir
from quantfab.tasks.quantize.grids import Encoded, Grid, GridRequest, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's AWQ_ORDER: word slot k holds column ORDER[k] of 8
LAYOUT = WordLayout(4, 0, True, 8, ORDER)  # codes and zero points alike: along the output dim, one line per input


class AWQOptions(BaseModel):
    """`{awq: int4}` or `{format: awq, type: int4, group_size: 64}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["awq"] = "awq"
    type: Literal["int4"] = Field(description="GEMM checkpoints are 4-bit.")
    group_size: int = Field(128, ge=1, description="Input elements per scale and zero point, for every quantized Linear.")
    symmetric: bool = Field(False, description="Codes on the symmetric grid (zero points all 8) instead of AWQ's "
                            "asymmetric one.")

    @property
    def key(self) -> str:
        return f"awq-{self.type}-g{self.group_size}" + ("-sym" if self.symmetric else "")


def packed_bytes(shape: tuple[int, ...], grid_name: str, dtype: torch.dtype) -> int:
    rows, cols = shape  # out, in
    groups = cols // grid_named(grid_name).block
    return cols * rows // 2 + groups * rows // 2 + groups * rows * 2


class AWQFormat(HFFolderFormat):
    name = "awq"
    options = AWQOptions
    packed_bytes = staticmethod(packed_bytes)

    def grid_for(self, options: AWQOptions, want: GridRequest, preset: str | None = None) -> Grid | None:
        if want.nf4:
            raise ValueError("awq checkpoints hold integer codes, not NF4 (use output bnb-nf4)")
        asked = (want.bits or 4, want.group_size or options.group_size,
                 options.symmetric if want.symmetric is None else want.symmetric)
        if asked[:2] != (4, options.group_size):
            raise ValueError(f"an awq GEMM checkpoint holds 4-bit codes with one group_size ({options.group_size}) "
                             "for every Linear; use compressed-tensors for mixed precision")
        return grid_named(f"INT4_G{options.group_size}_{'SYM' if asked[2] else 'ASYM'}")

    def write(self, path: Path, options: AWQOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], name: str) -> None:
        kept = sorted({t.hf_name.removesuffix(".weight") for t in planned if t.grid is None and len(t.shape) == 2
                       and "embed_tokens" not in t.hf_name} | {"lm_head"})
        config = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": options.group_size,
                  "zero_point": True, "modules_to_not_convert": kept}
        write_folder(path, model, config, planned, tensor_data)

    def pack(self, t: PlannedTensor, enc: Encoded) -> dict[str, torch.Tensor]:
        module = t.hf_name.removesuffix(".weight")
        zero = np.zeros(enc.d.shape, np.int8) if enc.m is None else enc.m.astype(np.int8)  # signed, (out, groups)
        return {f"{module}.qweight": torch.from_numpy(pack_words(enc.codes, LAYOUT)),
                f"{module}.qzeros": torch.from_numpy(pack_words(zero, LAYOUT)),
                f"{module}.scales": torch.from_numpy(enc.d.T.astype(np.float16).copy())}

    def reader(self, path: Path, config) -> FolderWeights:
        return FolderWeights(path, "qweight", decode_awq_gemm)

    def verify(self, folder: FolderWeights, t: PlannedTensor, expected: np.ndarray) -> Verdict:
        return verify_words(stored_ints(t.hf_name.removesuffix(".weight"), folder), expected)


def stored_ints(module: str, folder: FolderWeights) -> PackedInts:
    return PackedInts(folder.raw(f"{module}.qweight").numpy(), LAYOUT, folder.raw(f"{module}.scales").numpy(),
                      int(folder.config["quantization_config"]["group_size"]), scales_transposed=True,
                      zeros=folder.raw(f"{module}.qzeros").numpy(), zero_layout=LAYOUT)


def decode_awq_gemm(module: str, folder: FolderWeights) -> torch.Tensor:
    """(out, in) float32 weights: scales * (u - zeros), each repeated over its group of input rows."""
    p = stored_ints(module, folder)
    return torch.from_numpy(decode_reference(p, (p.words.shape[1] * 8, p.words.shape[0])))
