"""bnb-nf4: the safetensors checkpoint transformers writes for ``load_in_4bit`` NF4 (bitsandbytes' Params4bit).

Per quantized Linear: ``weight`` uint8 (out * in / 2, 1), the NF4 codebook indices of the flattened weight,
the first of each pair in the high nibble; ``weight.absmax`` float32, one per block of the flattened
weight (with double quantization: uint8 codes on the 8-bit dynamic map, plus ``weight.nested_absmax``,
``weight.nested_quant_map`` and the offset); ``weight.quant_map``, the 16 NF4 values; and
``weight.quant_state.bitsandbytes__nf4``, the JSON of the rest (blocksize, dtype, shape) as uint8 bytes,
exactly what ``QuantState.as_dict(packed=True)`` produces. Written without importing bitsandbytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantfab.kernels.nf4 import pack_nf4, verify_nf4
from quantfab.kernels.verdict import Verdict
from quantfab.tasks.convert.hf_folder import FolderWeights, HFFolderFormat, PlannedTensor, write_folder
from quantfab.tasks.modelio import ModelDir
from quantfab.tasks.quantize.grids import Encoded, Grid, GridRequest, NF4Grid, dynamic_map, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept


class BnbNF4Options(BaseModel):
    """`{bnb-nf4: nf4}`; the block size and double quantization come from quantize.group_size and quantize.nf4."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["bnb-nf4"] = "bnb-nf4"
    type: Literal["nf4"] = Field("nf4", description="NormalFloat-4, the only 4-bit type this format holds here.")
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="bnb_4bit_compute_dtype; empty: the model's own dtype.")

    @property
    def key(self) -> str:
        return "bnb-nf4"


def packed_bytes(shape: tuple[int, ...], grid_name: str, dtype: torch.dtype) -> int:
    grid = grid_named(grid_name)
    n = int(np.prod(shape))
    blocks = n // grid.block
    state = 150  # the quant_state JSON, about
    if getattr(grid, "double_quant", False):
        return n // 2 + blocks + -(-blocks // NF4Grid.NESTED_BLOCK) * 4 + 256 * 4 + 16 * 4 + state
    return n // 2 + blocks * 4 + 16 * 4 + state


class BnbNF4Format(HFFolderFormat):
    name = "bnb-nf4"
    options = BnbNF4Options
    packed_bytes = staticmethod(packed_bytes)

    def grid_for(self, options: BnbNF4Options, want: GridRequest, preset: str | None = None) -> Grid | None:
        if not want.nf4:
            raise ValueError("bnb-nf4 stores NF4 codes: use quantize.method nf4")
        if want.bits not in (None, 4) or want.symmetric is False:
            raise ValueError("NF4 is 4-bit and symmetric")
        block = want.group_size or 64
        if block not in BLOCKSIZES:
            raise ValueError(f"bitsandbytes block sizes are {', '.join(map(str, BLOCKSIZES))}, not {block}")
        return grid_named(f"NF4_B{block}" + ("_DQ" if want.double_quant else ""))

    def write(self, path: Path, options: BnbNF4Options, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], name: str) -> None:
        quantized = [t for t in planned if t.grid]
        double = bool(quantized) and getattr(grid_named(quantized[0].grid or ""), "double_quant", False)
        kept = sorted({t.hf_name.removesuffix(".weight") for t in planned if t.grid is None and len(t.shape) == 2
                       and "embed_tokens" not in t.hf_name} | {"lm_head"})
        dtype = options.compute_dtype or str(planned[0].dtype).removeprefix("torch.")
        config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double, "bnb_4bit_compute_dtype": dtype,
                  "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": kept, "llm_int8_threshold": 6.0,
                  "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
        write_folder(path, model, config, planned, tensor_data)

    def pack(self, t: PlannedTensor, enc: Encoded) -> dict[str, torch.Tensor]:
        grid = grid_named(t.grid or "")
        assert isinstance(grid, NF4Grid)
        w = t.hf_name
        state: dict = {"quant_type": "nf4", "blocksize": grid.block, "dtype": str(t.dtype).removeprefix("torch."),
                       "shape": list(t.shape)}
        out = {w: torch.from_numpy(pack_nf4(enc.codes).reshape(-1, 1)),
               f"{w}.quant_map": torch.from_numpy(NF4Grid.CODEBOOK.copy())}
        if grid.double_quant:
            out[f"{w}.absmax"] = torch.from_numpy(enc.extra["nested_codes"].astype(np.uint8))
            out[f"{w}.nested_absmax"] = torch.from_numpy(enc.extra["nested_absmax"].astype(np.float32))
            out[f"{w}.nested_quant_map"] = torch.from_numpy(dynamic_map().copy())
            state.update({"nested_blocksize": NF4Grid.NESTED_BLOCK, "nested_dtype": "float32",
                          "nested_offset": float(enc.extra["offset"][0])})
        else:
            out[f"{w}.absmax"] = torch.from_numpy(enc.d.reshape(-1).astype(np.float32))
        out[f"{w}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        return out

    def reader(self, path: Path, config) -> FolderWeights:
        return FolderWeights(path, "weight.quant_map", decode_bnb_nf4)

    def verify(self, folder: FolderWeights, t: PlannedTensor, expected: np.ndarray) -> Verdict:
        w = t.hf_name
        state = json.loads(bytes(folder.raw(f"{w}.quant_state.bitsandbytes__nf4").numpy().tolist()).decode())
        nested = None
        if "nested_offset" in state:
            nested = (folder.raw(f"{w}.nested_absmax").numpy(), folder.raw(f"{w}.nested_quant_map").numpy(),
                      int(state["nested_blocksize"]), float(state["nested_offset"]))
        return verify_nf4(folder.raw(w).numpy(), folder.raw(f"{w}.absmax").numpy(), folder.raw(f"{w}.quant_map").numpy(),
                          int(state["blocksize"]), expected, nested)


def decode_bnb_nf4(module: str, folder: FolderWeights) -> torch.Tensor:
    """quant_map[code] * absmax per block, the absmax first decoded from its nested 8-bit codes if stored so."""
    w = f"{module}.weight"
    state = json.loads(bytes(folder.raw(f"{w}.quant_state.bitsandbytes__nf4").numpy().tolist()).decode())
    packed = folder.raw(w).numpy().reshape(-1)
    codes = np.empty(packed.size * 2, np.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    absmax = folder.raw(f"{w}.absmax").numpy()
    if "nested_offset" in state:
        nested = np.repeat(folder.raw(f"{w}.nested_absmax").numpy(), int(state["nested_blocksize"]))[: absmax.size]
        absmax = (folder.raw(f"{w}.nested_quant_map").numpy()[absmax.astype(np.int64)] * nested
                  + np.float32(state["nested_offset"])).astype(np.float32)
    decoded = folder.raw(f"{w}.quant_map").numpy()[codes] * np.repeat(absmax, int(state["blocksize"]))
    return torch.from_numpy(decoded.astype(np.float32).reshape(state["shape"]))
