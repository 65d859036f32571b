"""gguf: llama.cpp's container, written with gguf-py's GGUFWriter and read back with its GGUFReader.

Quantized tensors store the method's codes unchanged on llama.cpp's Q8_0 / Q4_0 / Q4_1 grids (blocks
of 32, fp16 scales); 1-D tensors are F32 and other float tensors ``float_type``. Tensors are streamed to
the file one at a time, and q/k rows are permuted to llama.cpp's rotary layout as its converter does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import gguf
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import ModelDir, TensorInfo
from quantfab.tasks.quantize.grids import GRIDS, Encoded, Grid, GridRequest

QTYPE = gguf.GGMLQuantizationType
GRID_TYPES = {"Q8_0": QTYPE.Q8_0, "Q4_0": QTYPE.Q4_0, "Q4_1": QTYPE.Q4_1}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}


class GGUFOptions(BaseModel):
    """`{gguf: Q4_0}` or `{format: gguf, type: Q4_0, float_type: F16}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["gguf"] = "gguf"
    type: Literal["Q8_0", "Q4_0", "Q4_1", "F16", "F32"]
    float_type: Literal["F16", "F32"] = "F16"

    @property
    def key(self) -> str:
        return f"gguf-{self.type}"


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # (rows, cols) as in HF
    qtype: gguf.GGMLQuantizationType

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size


class GGUFFormat:
    name = "gguf"
    options = GGUFOptions

    def output_name(self, options: GGUFOptions, name: str) -> str:
        return f"{name}-{options.type}.gguf"

    def grid_for(self, options: GGUFOptions, want: GridRequest) -> Grid | None:
        """The GGUF grid that holds this request; None when the output type keeps floats."""
        if options.type not in GRID_TYPES:
            return None
        if want.nf4:
            raise ValueError("gguf has no NF4 grid")
        default = GRIDS[options.type]
        key = (want.bits or default.bits, want.group_size or default.block,
               default.symmetric if want.symmetric is None else want.symmetric)
        for name in GRID_TYPES:
            g = GRIDS[name]
            if (g.bits, g.block, g.symmetric) == key:
                return g
        raise ValueError(f"gguf has no grid with bits={key[0]}, group_size={key[1]}, symmetric={key[2]}; "
                         "it stores Q8_0 (8-bit symmetric), Q4_0 (4-bit symmetric) and Q4_1 (4-bit asymmetric), "
                         "all in blocks of 32")

    def stores_codes(self, options: GGUFOptions) -> bool:
        return options.type in GRID_TYPES

    def plan(self, options: GGUFOptions, config, tensors: dict[str, TensorInfo],
             grids: dict[str, str | None]) -> list[PlannedTensor]:
        """Every tensor the file will hold, in file order, with its GGUF name and type."""
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
        floating = QTYPE.F32 if options.type == "F32" or options.float_type == "F32" else QTYPE.F16
        out = []
        for name in sorted(tensors, key=_file_order):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UserError(f"tensor {name}: no GGUF name for it in llama.cpp's llama architecture")
            shape = tensors[name].shape
            grid = grids.get(name.removesuffix(".weight"))
            if grid is not None:
                qtype = GRID_TYPES[grid]
            elif len(shape) == 1:
                qtype = QTYPE.F32
            else:
                qtype = floating
            out.append(PlannedTensor(name, gname, shape, qtype))
        return out

    def write(self, path: Path, options: GGUFOptions, model: ModelDir, planned: list[PlannedTensor],
              tensor_data: Callable[[PlannedTensor], np.ndarray], name: str) -> None:
        """Stream the file: metadata and tensor infos first, then each tensor's bytes in order."""
        config = model.config()
        writer = gguf.GGUFWriter(str(path), "llama")
        _add_metadata(writer, config, options, name)
        _add_tokenizer(writer, model.path, int(config.vocab_size))
        for t in planned:
            if t.qtype in (QTYPE.F32, QTYPE.F16):
                dtype = np.float32 if t.qtype == QTYPE.F32 else np.float16
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(dtype), t.nbytes)
            else:
                block, size = gguf.GGML_QUANT_SIZES[t.qtype]
                byte_shape = (t.shape[0], t.shape[1] // block * size)
                writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in planned:
            writer.write_tensor_data(_permute_for_llama_cpp(t.hf_name, tensor_data(t), config))
        writer.close()

    def reader(self, path: Path, config) -> "GGUFTensors":
        return GGUFTensors(path, config)

    def float_tensor(self, t: PlannedTensor, w: np.ndarray) -> np.ndarray:
        return w.astype(np.float32 if t.qtype == QTYPE.F32 else np.float16)

    def pack(self, t: PlannedTensor, enc: Encoded) -> np.ndarray:
        return PACKERS[t.qtype.name](enc)


def _file_order(name: str) -> tuple:
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2, 0, name)


def _permute_for_llama_cpp(hf_name: str, data: np.ndarray, config) -> np.ndarray:
    """q/k rows in llama.cpp's rotary order (what convert_hf_to_gguf.py does for Llama)."""
    heads = int(config.num_attention_heads)
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute_rows(data, heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute_rows(data, int(config.num_key_value_heads or heads))
    return data


def permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def unpermute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    rows = data.shape[0]
    return data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _add_metadata(writer: gguf.GGUFWriter, config, options: GGUFOptions, name: str) -> None:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    writer.add_name(name)
    writer.add_quantized_by("quantfab")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.num_key_value_heads or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(FILE_TYPES[options.type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


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
    if len(tokens) != vocab_size:
        raise UserError(f"{folder}/tokenizer.json: {len(tokens)} tokens but config.json says vocab_size {vocab_size}")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if model == "gpt2":
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    else:
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(rows, blocks, 32) codes 0..15 -> (rows, blocks, 16) bytes: element j low, element j+16 high."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def pack_q8_0(enc: Encoded) -> np.ndarray:
    rows, cols = enc.codes.shape
    q = enc.codes.reshape(rows, cols // 32, 32).view(np.uint8)
    return np.concatenate([_fp16_bytes(enc.d), q], axis=-1).reshape(rows, -1)


def pack_q4_0(enc: Encoded) -> np.ndarray:
    rows, cols = enc.codes.shape
    q = (enc.codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // 32, 32)
    return np.concatenate([_fp16_bytes(enc.d), _pack_nibbles(q)], axis=-1).reshape(rows, -1)


def pack_q4_1(enc: Encoded) -> np.ndarray:
    assert enc.m is not None
    rows, cols = enc.codes.shape
    q = enc.codes.astype(np.uint8).reshape(rows, cols // 32, 32)
    return np.concatenate([_fp16_bytes(enc.d), _fp16_bytes(enc.m), _pack_nibbles(q)], axis=-1).reshape(rows, -1)


PACKERS: dict[str, Callable[[Encoded], np.ndarray]] = {"Q8_0": pack_q8_0, "Q4_0": pack_q4_0, "Q4_1": pack_q4_1}


class GGUFTensors:
    """Decoded float32 weights of a written file, under HF names: what ships is what is measured."""

    def __init__(self, path: Path, config):
        self.reader = gguf.GGUFReader(str(path))
        self.by_name = {t.name: t for t in self.reader.tensors}
        self.config = config
        self.tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))

    def types(self) -> Iterator[tuple[str, str]]:
        for t in self.reader.tensors:
            yield t.name, t.tensor_type.name

    def array(self, hf_name: str) -> np.ndarray:
        if hf_name == "lm_head.weight" and "output.weight" not in self.by_name:
            hf_name = "model.embed_tokens.weight"  # tied embeddings
        gname = self.tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = self.by_name[gname]
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        heads = int(self.config.num_attention_heads)
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = unpermute_rows(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = unpermute_rows(data, int(self.config.num_key_value_heads or heads))
        return data

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(self.array(n).copy()) for n in names}
