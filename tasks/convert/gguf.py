"""gguf: llama.cpp's container, written with gguf-py's GGUFWriter and read back with its GGUFReader.

``type`` is a llama-quantize file type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quant mixes Q2_K, Q3_K_S/M/L,
Q4_K_S/M, Q5_K_S/M, Q6_K, the non-linear IQ4_NL and IQ4_XS, the lattice mixes IQ3_M/S/XS/XXS, IQ2_M/S/XS/XXS,
IQ1_M/S, MXFP4_MOE (experts in llama.cpp's MXFP4), or F16/F32. Each tensor gets the GGML type llama-quantize would
give it (``gguf_types``). Decoder-layer Linears hold the method's codes on that type's grid (a lattice type's
codes come from its own search: ``lattice``); the embedding and
the output head, which no method quantizes, are rounded to nearest by the grid's reference rule, which
is llama.cpp's own. 1-D tensors and routers are F32 and other float tensors ``float_type``. Tensors are
streamed to the file one at a time, and q/k rows are permuted to llama.cpp's rotary layout as its
converter does. A layer's experts (one checkpoint tensor per expert and matrix) are one 3-D tensor per
matrix in the file (``ffn_gate_exps``: experts x rows x columns), as llama.cpp's converter stacks them;
every expert of one stacked tensor must then have the same type.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantfab.tasks.activations import MeasuredScales
from quantfab.kernels.gguf_blocks import pack_gguf, verify_gguf
from quantfab.kernels.verdict import Verdict
from quantfab.tasks.convert.gguf_layouts import METADATA, SPLITS, split_of
from quantfab.tasks.convert.gguf_types import DEFAULT_TYPE, ModelFacts, TypeChoice, choose_types
from quantfab.tasks.convert.imatrix import Importance, ImportanceFile, write_imatrix
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import IMATRIX_FILE
from quantfab.tasks.families import GGUFArch, family
from quantfab.tasks.modelio import ModelDir, TensorInfo
from quantfab.tasks.quantize.grid_base import reference_by_rows
from quantfab.tasks.quantize.grids import GRIDS, Encoded, Grid, GridRequest
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

QTYPE = gguf.GGMLQuantizationType
EXPERT = re.compile(r"\.experts\.(\d+)\.")  # a checkpoint's per-expert tensor name; gguf-py maps the stacked name
F32_ROUTERS = "ffn_gate_inp.weight"  # llama.cpp's converter writes routers F32 and llama-quantize never quantizes them
SIMPLE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # blocks of 32: what explicit bits/symmetric pick from
BUDGET_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", *SIMPLE_TYPES, "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S",
                "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")  # what a size budget picks among
FileType = Literal["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                   "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M",
                   "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "MXFP4_MOE", "F16", "F32"]
UNWEIGHTED = ("Q8_0", "MXFP4_MOE", "F16", "F32")  # file types whose codes an importance matrix leaves alone: imatrix
# off by default
GRID_OF_TYPE = {"MXFP4": "MXFP4_GGML"}  # GGML types whose grid has a name of its own (compressed-tensors' MXFP4 rounds
# otherwise)
TYPE_OF_GRID = {g: t for t, g in GRID_OF_TYPE.items()}
TYPE_TABLE = ".tensor-types.txt"  # a budgeted file's types, beside it, as llama-quantize --tensor-type-file reads them


class GGUFOptions(BaseModel):
    """`{gguf: Q4_K_M}` or `{format: gguf, type: Q4_K_M, pure: true, float_type: F32}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["gguf"] = "gguf"
    type: FileType
    pure: bool = False  # every quantized tensor of the type itself, as llama-quantize --pure
    float_type: Literal["F16", "F32"] = "F16"
    imatrix: bool = True  # quantize with llama.cpp's importance matrix of the calibration inputs and ship it beside
    # the file; unless given, on for every type but Q8_0, F16 and F32
    target_bits_per_weight: float | None = Field(None, gt=1, le=32, description=(
        "A size budget instead of the type's mix: the tensors' bytes per model parameter, in bits (llama.cpp's "
        "BPW; the file adds its metadata and vocabulary). Each decoder-layer Linear gets the K, legacy or IQ type "
        "(IQ1-IQ3 only with imatrix) that minimises the summed output error within it (tasks/quantize/allocate.py); "
        "the embedding and head keep ``type``'s choice."))

    @model_validator(mode="before")
    @classmethod
    def _imatrix_by_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("imatrix") is None:
            return {**data, "imatrix": data.get("type") not in UNWEIGHTED}
        return data

    @property
    def key(self) -> str:
        default = self.type not in UNWEIGHTED
        return (f"gguf-{self.type}" + ("-pure" if self.pure else "")
                + ("" if self.imatrix == default else "-imatrix" if self.imatrix else "-noimatrix")
                + (f"-{self.target_bits_per_weight:g}bpw" if self.target_bits_per_weight else ""))


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # (rows, cols) as in HF
    qtype: gguf.GGMLQuantizationType
    expert: int | None = None  # this expert's matrix in the stacked tensor ``gguf_name``
    experts: int = 1  # matrices stacked in ``gguf_name``
    part: int | None = None  # which part of a split checkpoint tensor (gguf_layouts); ``shape`` is the part's
    dims: tuple[int, ...] = ()  # the sizes the split needs

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def quantized(self) -> bool:
        return self.qtype not in (QTYPE.F32, QTYPE.F16)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size


class GGUFFormat:
    name = "gguf"
    options = GGUFOptions

    def output_name(self, options: GGUFOptions, name: str) -> str:
        return f"{name}-{options.key.removeprefix('gguf-')}.gguf"

    def presets(self, options: GGUFOptions, config, tensors: dict[str, TensorInfo]) -> dict[str, str | None]:
        """Module -> the GGML type llama-quantize gives its weight (``float_type`` if it stays float), per 2-D weight.
        (Plan and quantize call this first: a family GGUF cannot be written for is refused here.)"""
        gguf_arch(config)
        if not self.stores_codes(options):
            return {}
        listed = list(_file_tensors(config, tensors))
        return _presets(options, listed, _types(options, config, listed))

    def fallbacks(self, options: GGUFOptions, config, tensors: dict[str, TensorInfo]) -> dict[str, str]:
        """Module (or tensor) -> why llama-quantize's row-length rules moved it off the file type's mix."""
        if not self.stores_codes(options):
            return {}
        listed = list(_file_tensors(config, tensors))
        types = _types(options, config, listed)
        return {hf.removesuffix(".weight"): types[g].fallback.replace("-> float", f"-> {options.float_type}")
                for hf, g, _, _, _, _ in listed if types[g].fallback}

    def grid_for(self, options: GGUFOptions, want: GridRequest, preset: str | None = None) -> Grid | None:
        """The grid that holds this request for a tensor whose file-type choice is ``preset``.

        ``preset`` is what ``presets`` gives the tensor, None with no tensor in view (recipe checks). The
        result is None when the tensor stays float. A request without bits, group or symmetry takes the
        preset (or the file type's default type); explicit ones pick among the blocks of 32.
        """
        if not self.stores_codes(options) or preset == SPLIT_PRESET:
            return None
        if want.nf4:
            raise ValueError("gguf has no NF4 grid")
        default = GRIDS[preset] if preset in GRIDS else GRIDS[grid_of(DEFAULT_TYPE[options.type])]
        if want.bits is None and want.group_size is None and want.symmetric is None:
            return None if preset is not None and preset not in GRIDS else default
        bits = want.bits or default.bits
        if want.group_size not in (None, 32):
            raise ValueError(f"gguf has no grid with group_size={want.group_size}: llama.cpp's 4/5/8-bit types use "
                             "blocks of 32 (K-quants come from the file type itself, e.g. Q4_K_M)")
        fits = [GRIDS[t] for t in SIMPLE_TYPES if GRIDS[t].bits == bits
                and (want.symmetric is None or GRIDS[t].symmetric == want.symmetric)]
        fits.sort(key=lambda g: g.symmetric != default.symmetric)
        if not fits:
            raise ValueError(f"gguf has no grid with bits={bits}" + ("" if want.symmetric is None else f", symmetric={want.symmetric}")
                             + "; explicit settings pick among Q8_0 (8-bit symmetric), Q4_0/Q5_0 (symmetric) and "
                             "Q4_1/Q5_1 (with a min), all in blocks of 32")
        return fits[0]

    def budget_grids(self, options: GGUFOptions, preset: str | None = None) -> list[str]:
        """The types a size budget picks among: K and legacy types, IQ4, and the lattice IQ types where an importance
        matrix is on (llama.cpp quantizes them only with one)."""
        return [t for t in BUDGET_TYPES if options.imatrix or not getattr(GRIDS[t], "needs_importance", False)]

    def type_table_name(self, options: GGUFOptions, name: str) -> str:
        return self.output_name(options, name).removesuffix(".gguf") + TYPE_TABLE

    def type_table(self, planned: list[PlannedTensor]) -> str:
        """Every quantized tensor's type as llama-quantize --tensor-type-file reads it (``^name$=type``, one per
        line): shipped beside a budgeted file, so llama.cpp can build the same mix (from its F16/F32 file, with the
        same importance matrix: the same bytes)."""
        return "".join(f"^{re.escape(t.gguf_name)}$={t.type_name.lower()}\n" for t in planned
                       if t.quantized and t.expert in (None, 0))

    def ships_importance(self, options: GGUFOptions) -> bool:
        return options.imatrix

    def importance_name(self, options: GGUFOptions, name: str) -> str:
        return self.output_name(options, name).removesuffix(".gguf") + IMATRIX_FILE

    def write_importance(self, path: Path, config, tensors: dict[str, TensorInfo], importance: Importance, dataset: str,
                         chunk_size: int, chunks: int) -> ImportanceFile:
        """llama.cpp's imatrix file of ``importance`` under the file's tensor names (an expert set's experts as the
        rows of its stacked tensor). A tensor the file holds split in parts has none: llama-quantize quantizes
        it without, as it does the embedding and the head."""
        rows: dict[str, dict[int, tuple[np.ndarray, int]]] = {}
        for hf_name, gguf_name, expert, part, _, _ in _file_tensors(config, tensors):
            if part is None and hf_name in importance:
                rows.setdefault(gguf_name, {})[expert or 0] = importance[hf_name]
        write_imatrix(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[gguf_arch(config).arch]],
                      {n: [r[e] for e in sorted(r)] for n, r in rows.items()}, dataset, chunk_size, chunks)
        return ImportanceFile(path.name, dataset, len(rows), chunks)

    def stores_codes(self, options: GGUFOptions) -> bool:
        return options.type in DEFAULT_TYPE

    def measured_scales(self, options: GGUFOptions) -> MeasuredScales:
        return MeasuredScales()  # llama.cpp quantizes no activation or cache entry with a stored scale

    def float_note(self, options: GGUFOptions, preset: str | None) -> str | None:
        """Why a tensor the file holds split keeps floats for the methods (what assign reports); None: the usual."""
        if preset == SPLIT_PRESET:
            return (f"{options.key} holds it split and reshaped as llama.cpp's converter does (no method's codes "
                    "fit the parts): each part rounded to nearest by the file type's rule")
        return None

    def plan(self, options: GGUFOptions, config, tensors: dict[str, TensorInfo],
             grids: dict[str, str | None], as_asked: bool = False) -> list[PlannedTensor]:
        """Every tensor the file will hold, in file order, with its GGUF name and type.

        Layer Linears take the grid quantize used (``grids``; None there means kept in float); other 2-D
        weights take the file type's choice. ``as_asked``: the file had no row-length rule moved any tensor
        off the mix (for the nominal size).
        """
        floating = QTYPE.F32 if options.type == "F32" or options.float_type == "F32" else QTYPE.F16
        listed = list(_file_tensors(config, tensors))
        types = _types(options, config, listed) if self.stores_codes(options) else {}
        presets = _presets(options, listed, types) if self.stores_codes(options) else {}
        counts: dict[str, int] = {}
        for _, gname, _, _, _, _ in listed:
            counts[gname] = counts.get(gname, 0) + 1
        out = []
        for name, gname, expert, part, shape, dims in listed:
            module = name.removesuffix(".weight")
            if part is not None:
                chosen = grid_of(types[gname].type) if gname in types else None
            else:
                chosen = grids[module] if module in grids else presets.get(module)
            if as_asked and gname in types and types[gname].fallback and \
                    chosen in (grid_of(types[gname].type), options.float_type):
                chosen = grid_of(types[gname].wanted)
            if chosen in GRIDS:
                qtype = QTYPE[TYPE_OF_GRID.get(chosen, chosen)]
            elif len(shape) == 1 or gname.endswith(F32_ROUTERS):
                qtype = QTYPE.F32
            else:
                qtype = floating
            out.append(PlannedTensor(name, gname, shape, qtype, expert, counts[gname], part, dims))
        for gname in (g for g, n in counts.items() if n > 1):
            parts = [t for t in out if t.gguf_name == gname]
            if len({t.qtype for t in parts}) > 1 or len({t.shape for t in parts}) > 1:
                raise UserError(f"gguf: {gname} stacks {', '.join(t.hf_name for t in parts[:3])}... into one tensor, "
                                f"but they have types {sorted({t.type_name for t in parts})} and shapes "
                                f"{sorted({t.shape for t in parts})}; every expert of a layer needs the same "
                                "(check quantize.overrides and quantize.ignore)")
        return out

    def write(self, path: Path, options: GGUFOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], np.ndarray], name: str,
              importance: ImportanceFile | None = None) -> None:
        """Stream the file: metadata and tensor infos first, then each tensor's bytes in order. A file quantized
        with an ``importance`` matrix says so in llama-quantize --imatrix's keys."""
        config = model.config()
        arch = gguf_arch(config)
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.arch]])
        _add_metadata(writer, config, options, name, arch)
        if importance is not None and self.stores_codes(options):
            writer.add_string("quantize.imatrix.file", importance.file)
            writer.add_string("quantize.imatrix.dataset", importance.dataset)
            writer.add_uint32("quantize.imatrix.entries_count", importance.entries)
            writer.add_uint32("quantize.imatrix.chunks_count", importance.chunks)
        _add_tokenizer(writer, model.path, int(config.vocab_size))
        for t in planned:
            if t.expert not in (None, 0):
                continue  # the stacked tensor is declared once, by its first expert
            stack = (t.experts,) if t.expert is not None else ()
            if not t.quantized:
                dtype = np.float32 if t.qtype == QTYPE.F32 else np.float16
                writer.add_tensor_info(t.gguf_name, (*stack, *t.shape), np.dtype(dtype), t.nbytes * t.experts)
            else:
                block, size = gguf.GGML_QUANT_SIZES[t.qtype]
                byte_shape = (*stack, *t.shape[:-1], t.shape[-1] // block * size)
                writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes * t.experts,
                                       raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        parts: list[np.ndarray] = []
        for t in planned:
            data = _to_llama_cpp(t.hf_name, tensor_data(t), config, arch)
            if t.expert is None:
                writer.write_tensor_data(data)
                continue
            parts.append(data)
            if len(parts) == t.experts:  # the last expert of the set: the whole stack, in expert order
                writer.write_tensor_data(np.stack(parts))
                parts = []
        writer.close()

    def reader(self, path: Path, config) -> "GGUFTensors":
        return GGUFTensors(path, config)

    def float_codes(self, t: PlannedTensor, load: Callable[[], np.ndarray]) -> tuple[Grid, Encoded] | None:
        """llama.cpp's round-to-nearest codes of a tensor no method quantized, where its type is quantized
        (a split tensor's part: its rows, heads one after the other)."""
        if not t.quantized:
            return None
        grid = GRIDS[grid_of(t.type_name)]
        w = _part(t, load().astype(np.float32))
        return grid, reference_by_rows(grid, w.reshape(-1, w.shape[-1]))

    def float_tensor(self, t: PlannedTensor, w: np.ndarray) -> np.ndarray:
        return _part(t, w).astype(np.float32 if t.qtype == QTYPE.F32 else np.float16)

    def pack(self, t: PlannedTensor, enc: Encoded) -> np.ndarray:
        return pack_gguf(t.type_name, enc)

    def verify(self, tensors: "GGUFTensors", t: PlannedTensor, expected: np.ndarray) -> Verdict:
        raw = tensors.raw(t.hf_name) if t.part is None else tensors.raw_named(t.gguf_name)
        return verify_gguf(t.type_name, raw, expected)


SPLIT_PRESET = "split"  # presets' value for a tensor the file holds split (gguf_layouts): no method's codes fit


def _types(options: GGUFOptions, config, listed: list[FileTensor]) -> dict[str, TypeChoice]:
    """GGUF name -> llama-quantize's type for it (None: float), an expert set or split part once, in file order."""
    stacked = list({g: shape for _, g, _, _, shape, _ in listed}.items())
    return choose_types(options.type, stacked, ModelFacts.of(config), options.pure, options.imatrix)


def _presets(options: GGUFOptions, listed: list[FileTensor], types: dict[str, TypeChoice]) -> dict[str, str | None]:
    """Module -> its preset type (``float_type`` where llama-quantize keeps it float; SPLIT_PRESET where the
    file holds it split)."""
    out = {hf.removesuffix(".weight"): grid_of(types[g].type) or options.float_type
           for hf, g, _, part, shape, _ in listed if len(shape) == 2 and part is None}
    return out | {hf.removesuffix(".weight"): SPLIT_PRESET for hf, _, _, part, _, _ in listed if part is not None}


def grid_of(type_name: str | None) -> str | None:
    """The grid that codes a GGML type (None: float)."""
    return GRID_OF_TYPE.get(type_name, type_name) if type_name else type_name


def _part(t: PlannedTensor, w: np.ndarray) -> np.ndarray:
    """What the file holds for ``t``: the checkpoint tensor, or its part when the converter splits it."""
    if t.part is None:
        return w
    split = split_of_name(t.hf_name)
    return split.forward(w, t.dims)[t.part]


def gguf_arch(config) -> GGUFArch:
    """The family's GGUF layout, or a UserError naming what is missing (before any quantization runs)."""
    arch = family(config.model_type).gguf
    if arch is None:
        raise UserError(f"gguf: model_type {config.model_type!r} has no GGUF writer in quantfab yet (llama.cpp's "
                        "converter knows more families than quantfab writes); compressed-tensors, gptq, awq and "
                        "bnb-nf4 outputs work for it (`quantfab families` lists what works where)")
    for attribute, value in arch.requires:
        name, _, key = attribute.partition(".")
        found = getattr(config, name, None)
        found = (found or {}).get(key) if key else found
        if found != value:
            raise UserError(f"gguf: model_type {config.model_type!r} with {attribute}={found!r:.60}: "
                            f"llama.cpp's {arch.arch.lower()} architecture computes it only as {attribute}={value!r}, "
                            "so the file would run a different model; compressed-tensors, gptq and awq outputs work")
    return arch


def _name_map(config, arch: GGUFArch) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.arch], int(config.num_hidden_layers))


FileTensor = tuple[str, str, "int | None", "int | None", tuple[int, ...], tuple[int, ...]]


def _file_tensors(config, tensors: dict[str, TensorInfo]) -> Iterator[FileTensor]:
    """(HF name, GGUF name, expert, part, shape, split dims) of every tensor the file holds, in file order (a
    stacked tensor's experts in expert order; a split tensor's parts in order, each with its own shape)."""
    arch = gguf_arch(config)
    tmap = _name_map(config, arch)
    for name in sorted(tensors, key=_file_order):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        split = split_of(arch.arch, name)
        if split is not None:
            dims = split.dims(config)
            for k, (part, shape) in enumerate(zip(split.parts, split.shapes(dims))):
                yield name, _gguf_name(tmap, name.removesuffix(split.suffix) + part, arch), None, k, shape, dims
            continue
        stacked, expert = _stacked(name)
        yield name, _gguf_name(tmap, stacked, arch), expert, None, tensors[name].shape, ()


def _gguf_name(tmap: gguf.TensorNameMap, name: str, arch: GGUFArch) -> str:
    gname = _mapped(tmap, name)
    if gname is None:
        raise UserError(f"tensor {name}: no GGUF name for it in llama.cpp's {arch.arch.lower()} architecture")
    return gname


def _mapped(tmap: gguf.TensorNameMap, name: str) -> str | None:
    # the converter's spelling of DeepSeek-style router biases, for every architecture (its ModelBase does it)
    return tmap.get_name(name.replace("e_score_correction_bias", "e_score_correction.bias"),
                         try_suffixes=(".weight", ".bias"))


def split_of_name(hf_name: str):
    """The split (of any architecture) a checkpoint tensor name ends with."""
    return next(s for splits in SPLITS.values() for s in splits if hf_name.endswith(s.suffix))


def _stacked(name: str) -> tuple[str, int | None]:
    """A per-expert checkpoint name as the name of its expert set (what gguf-py maps), and the expert."""
    match = EXPERT.search(name)
    if match is None:
        return name, None
    return name[:match.start()] + ".experts." + name[match.end():], int(match.group(1))


def _file_order(name: str) -> tuple:
    stacked, expert = _stacked(name)
    if name.startswith("model.embed_tokens"):
        return (0, 0, name, 0)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), stacked, expert or 0)
    return (2, 0, name, 0)


def _to_llama_cpp(hf_name: str, data: np.ndarray, config, arch: GGUFArch) -> np.ndarray:
    """What llama.cpp's converter stores: q/k rows in its rotary order (Llama-style families), norms shifted."""
    heads = int(config.num_attention_heads)
    if arch.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
        return permute_rows(data, heads)
    if arch.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
        return permute_rows(data, int(config.num_key_value_heads or heads))
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return (data + np.float32(arch.norm_shift)).astype(data.dtype)
    return data


def permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def unpermute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    rows = data.shape[0]
    return data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _add_metadata(writer: gguf.GGUFWriter, config, options: GGUFOptions, name: str, arch: GGUFArch) -> None:
    """Every key once: the common ones, then the family's (``extras``: the first attribute a config sets, per
    key; ``gguf_layouts.METADATA``: values computed from several), a later value replacing an earlier one."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(options.type, f"MOSTLY_{options.type}")
    rope = getattr(config, "rope_parameters", None) or {}
    full, sliding = rope.get("full_attention", rope), rope.get("sliding_attention", {})  # per layer type (Gemma 3)
    keys: dict[str, Any] = {
        "add_name": name, "add_quantized_by": "quantfab", "add_context_length": int(config.max_position_embeddings),
        "add_embedding_length": int(config.hidden_size), "add_block_count": int(config.num_hidden_layers),
        "add_feed_forward_length": int(config.intermediate_size), "add_rope_dimension_count": int(head_dim),
        "add_head_count": heads, "add_head_count_kv": int(config.num_key_value_heads or heads),
        "add_layer_norm_rms_eps": float(config.rms_norm_eps),
        "add_rope_freq_base": float(getattr(config, "rope_theta", None) or full.get("rope_theta", 10000.0))}
    if sliding.get("rope_theta") is not None:
        keys["add_rope_freq_base_swa"] = float(sliding["rope_theta"])
    if arch.layer_pattern:
        keys["add_sliding_window_pattern"] = [t == "sliding_attention" for t in config.layer_types]
    keys |= {"add_vocab_size": int(config.vocab_size), "add_file_type": int(gguf.LlamaFileType[file_type]),
             "add_quantization_version": gguf.GGML_QUANT_VERSION}
    if arch.head_dims and getattr(config, "head_dim", None):
        keys |= {"add_key_length": int(config.head_dim), "add_value_length": int(config.head_dim)}
    for method, attribute in arch.extras:
        if getattr(config, attribute, None) is not None and method not in keys:
            keys[method] = getattr(config, attribute)
    keys |= dict(METADATA[arch.arch](config)) if arch.arch in METADATA else {}
    for method, value in keys.items():
        getattr(writer, method)(value)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's converter writes it (Llama BPE with byte fallback, or GPT-2 BPE)."""
    try:
        vocab: gguf.Vocab = gguf.LlamaHfVocab(folder)
        model, pre = "llama", "default"
    except (FileNotFoundError, TypeError):
        try:
            vocab = gguf.BpeVocab(folder)
        except FileNotFoundError:
            raise UserError(f"{folder}: no tokenizer.json that llama.cpp can use") from None
        model, pre = "gpt2", "default"
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    if len(tokens) > vocab_size:
        raise UserError(f"{folder}/tokenizer.json: {len(tokens)} tokens but config.json says vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows no token uses (Qwen pads to a round size), as llama.cpp pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if model == "gpt2":
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    else:
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


class GGUFTensors:
    """Decoded float32 weights of a written file, under HF names: what ships is what is measured."""

    def __init__(self, path: Path, config):
        self.reader = gguf.GGUFReader(str(path))
        self.by_name = {t.name: t for t in self.reader.tensors}
        self.config = config
        self.arch = gguf_arch(config)
        self.tmap = _name_map(config, self.arch)

    def types(self) -> Iterator[tuple[str, str]]:
        for t in self.reader.tensors:
            yield t.name, t.tensor_type.name

    def _tensor(self, hf_name: str) -> tuple[str, Any, int | None]:
        if hf_name == "lm_head.weight" and "output.weight" not in self.by_name:
            hf_name = "model.embed_tokens.weight"  # tied embeddings
        stacked, expert = _stacked(hf_name)
        return hf_name, self.by_name[_mapped(self.tmap, stacked)], expert

    def _hf_rows(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Rows back in HF order: llama.cpp's q/k rows are permuted for its rotary layout (Llama-style families)."""
        heads = int(self.config.num_attention_heads)
        if self.arch.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
            return unpermute_rows(data, heads)
        if self.arch.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
            return unpermute_rows(data, int(self.config.num_key_value_heads or heads))
        return data

    def array(self, hf_name: str) -> np.ndarray:
        split = split_of(self.arch.arch, hf_name)
        if split is not None:  # the checkpoint tensor, joined back from its parts
            base = hf_name.removesuffix(split.suffix)
            return split.inverse([self._dequantized(self.by_name[_mapped(self.tmap, base + p)]) for p in split.parts],
                                 split.dims(self.config))
        hf_name, t, expert = self._tensor(hf_name)
        values = self._hf_rows(hf_name, self._dequantized(t, expert))
        if self.arch.norm_shift and hf_name.endswith("norm.weight"):  # the model's own weight, as transformers reads it
            values = values - np.float32(self.arch.norm_shift)
        return values

    def _dequantized(self, t: Any, expert: int | None = None) -> np.ndarray:
        """A tensor's values in its HF shape (one expert's matrix of a stacked tensor: its own blocks only)."""
        data, shape = np.asarray(t.data), tuple(int(x) for x in reversed(t.shape))
        if expert is not None:
            data, shape = data[expert], shape[1:]
        return np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)

    def raw_named(self, gguf_name: str) -> np.ndarray:
        """A tensor's stored blocks by its GGUF name, (rows, row bytes) uint8."""
        data = np.asarray(self.by_name[gguf_name].data)
        return data.reshape(-1, data.shape[-1])

    def raw(self, hf_name: str) -> np.ndarray:
        """A quantized tensor's stored blocks, (rows, row bytes) uint8, rows in HF order."""
        hf_name, t, expert = self._tensor(hf_name)
        data = np.asarray(t.data)
        if expert is not None:
            data = data[expert]
        return self._hf_rows(hf_name, data.reshape(data.shape[0], -1))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {n: torch.from_numpy(self.array(n).copy()) for n in names}
        # The reader maps the whole file: drop the pages just read, or the process would keep every layer it
        # has validated resident (a layer at a time is all validate needs)
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)
        return out
